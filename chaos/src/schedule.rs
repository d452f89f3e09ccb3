//! The seeded fault schedule: the same seed and profile give the same faults, in the same order,
//! at the same offsets from the start of the fault phase.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How a planned fault picks its node(s) when it starts (leaders move, so the schedule names a
/// role, and the harness resolves it against the cluster then).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The node leading the most shards.
    BusiestLeader,
    /// Node `n` (1-based).
    Node(u64),
}

/// One planned fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Planned {
    /// `kill -9`, restart after `down`.
    Kill {
        /// Which node.
        target: Target,
    },
    /// SIGSTOP, SIGCONT after `down` (past the election timeout: a zombie leader).
    Pause {
        /// Which node.
        target: Target,
    },
    /// SIGTERM (a graceful stop), restart after `down`.
    Terminate {
        /// Which node.
        target: Target,
    },
    /// Drop a fifth of the packets one node sends, at random (TCP retransmits them late).
    Lossy {
        /// Which node.
        target: Target,
    },
    /// The node is lost with its disk; it is removed and a new node joins in its place.
    Replace {
        /// Which node.
        target: Target,
    },
    /// Cut the network around one node (both ways, or only its outgoing traffic).
    Isolate {
        /// Which node.
        target: Target,
        /// Only the node's outgoing packets are dropped.
        one_way: bool,
    },
    /// A bridge (5 nodes and more): the other members split into two halves that cannot reach
    /// each other, and this node alone reaches both (neither half is a majority without it).
    Bridge {
        /// The bridge node.
        target: Target,
    },
    /// Two faults at once on two different nodes: the majority is lost for `down`.
    Double {
        /// The first node's fault.
        first: Box<Planned>,
        /// The second node's fault.
        second: Box<Planned>,
    },
}

/// A fault at an offset of the fault phase, lasting `down`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Pause before the fault, after the previous one healed.
    pub gap: Duration,
    /// How long the fault lasts.
    pub down: Duration,
    /// The fault.
    pub fault: Planned,
}

/// A profile's fault rate and duration.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    /// How long the fault phase runs.
    pub duration: Duration,
    /// Nodes in the cluster.
    pub nodes: u64,
    /// Whether kernel partitions are available (a private network namespace as root).
    pub partitions: bool,
    /// Whether nodes are lost and replaced.
    pub replacements: bool,
}

fn one(rng: &mut StdRng, nodes: u64, partitions: bool) -> Planned {
    let target =
        if rng.random_bool(0.5) { Target::BusiestLeader } else { Target::Node(rng.random_range(1..=nodes)) };
    let kinds = if partitions { 6 } else { 3 };
    match rng.random_range(0..kinds) {
        0 => Planned::Kill { target },
        1 => Planned::Pause { target },
        2 => Planned::Terminate { target },
        3 => Planned::Isolate { target, one_way: false },
        4 => Planned::Isolate { target, one_way: rng.random_bool(0.3) },
        _ => Planned::Lossy { target },
    }
}

/// The schedule of `profile` for `seed`: faults one after the other, each lasting 1–6 s after a
/// gap of 0.5–3 s; one in eight is a double fault on two nodes (the majority lost).
pub fn plan(seed: u64, profile: Profile) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    // Replacements are drawn from a stream of their own: they turn one single fault in fifteen
    // into the loss of its node (with its own address free for the successor, so only with
    // partitions' per-node addresses), leaving every other draw of the plan as it was.
    let mut replace_rng = StdRng::seed_from_u64(seed ^ 0x5eed_5eed_5eed_5eed);
    // Bridges likewise (and only with 5 nodes or more): one single fault in eight.
    let mut bridge_rng = StdRng::seed_from_u64(seed ^ 0xb1d6_e5b1_d6e5_b1d6);
    let mut steps = Vec::new();
    let mut at = Duration::ZERO;
    while at < profile.duration {
        let gap = Duration::from_millis(rng.random_range(500..3_000));
        let down = Duration::from_millis(rng.random_range(1_000..6_000));
        let fault = if profile.nodes >= 3 && rng.random_bool(0.125) {
            let a = rng.random_range(1..=profile.nodes);
            let b = (a % profile.nodes) + 1;
            let pick = |rng: &mut StdRng, n: u64| match one(rng, profile.nodes, profile.partitions) {
                Planned::Kill { .. } => Planned::Kill { target: Target::Node(n) },
                Planned::Pause { .. } => Planned::Pause { target: Target::Node(n) },
                Planned::Terminate { .. } => Planned::Terminate { target: Target::Node(n) },
                Planned::Isolate { one_way, .. } => Planned::Isolate { target: Target::Node(n), one_way },
                Planned::Lossy { .. } => Planned::Lossy { target: Target::Node(n) },
                // Never part of a double fault: the majority must survive a replacement.
                Planned::Replace { .. } | Planned::Bridge { .. } | Planned::Double { .. } => {
                    Planned::Kill { target: Target::Node(n) }
                }
            };
            let first = pick(&mut rng, a);
            let second = pick(&mut rng, b);
            Planned::Double { first: Box::new(first), second: Box::new(second) }
        } else {
            let single = one(&mut rng, profile.nodes, profile.partitions);
            match single {
                Planned::Kill { target }
                | Planned::Pause { target }
                | Planned::Terminate { target }
                | Planned::Lossy { target }
                | Planned::Isolate { target, .. }
                    if profile.replacements
                        && profile.partitions
                        && profile.nodes >= 3
                        && replace_rng.random_bool(1.0 / 15.0) =>
                {
                    Planned::Replace { target }
                }
                Planned::Kill { target }
                | Planned::Pause { target }
                | Planned::Terminate { target }
                | Planned::Lossy { target }
                | Planned::Isolate { target, .. }
                    if profile.partitions && profile.nodes >= 5 && bridge_rng.random_bool(1.0 / 8.0) =>
                {
                    Planned::Bridge { target }
                }
                other => other,
            }
        };
        at += gap + down;
        steps.push(Step { gap, down, fault });
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(partitions: bool) -> Profile {
        Profile { duration: Duration::from_secs(180), nodes: 3, partitions, replacements: true }
    }

    #[test]
    fn the_same_seed_plans_the_same_faults_and_another_seed_others() {
        assert_eq!(plan(42, profile(true)), plan(42, profile(true)));
        assert_ne!(plan(42, profile(true)), plan(43, profile(true)));
    }

    #[test]
    fn a_ci_run_plans_enough_faults_of_every_kind() {
        for seed in 0..20 {
            let steps = plan(seed, profile(true));
            let flat: Vec<&Planned> = steps
                .iter()
                .flat_map(|s| match &s.fault {
                    Planned::Double { first, second } => vec![first.as_ref(), second.as_ref()],
                    other => vec![other],
                })
                .collect();
            let count = |f: fn(&Planned) -> bool| flat.iter().filter(|p| f(p)).count();
            assert!(flat.len() >= 30, "seed {seed}: {} faults", flat.len());
            assert!(count(|p| matches!(p, Planned::Isolate { .. })) >= 3, "seed {seed}: partitions");
            assert!(count(|p| matches!(p, Planned::Pause { .. })) >= 2, "seed {seed}: pauses");
        }
    }

    #[test]
    fn replacements_are_planned_now_and_then_and_never_in_a_double_fault() {
        let replaced: usize = (0..20)
            .map(|seed| {
                plan(seed, profile(true))
                    .iter()
                    .filter(|s| matches!(s.fault, Planned::Replace { .. }))
                    .count()
            })
            .sum();
        assert!(replaced >= 10, "{replaced} replacements in 20 plans");
        for seed in 0..20 {
            for step in plan(seed, profile(true)) {
                if let Planned::Double { first, second } = step.fault {
                    assert!(
                        !matches!(*first, Planned::Replace { .. })
                            && !matches!(*second, Planned::Replace { .. })
                    );
                }
            }
        }
        assert!(plan(1, profile(false)).iter().all(|s| !matches!(s.fault, Planned::Replace { .. })));
        let ci = Profile { replacements: false, ..profile(true) };
        assert!(
            (0..20).all(|seed| plan(seed, ci).iter().all(|s| !matches!(s.fault, Planned::Replace { .. })))
        );
    }

    #[test]
    fn bridges_are_planned_with_five_nodes_only() {
        let five = Profile { nodes: 5, ..profile(true) };
        let bridges: usize = (0..20)
            .map(|seed| plan(seed, five).iter().filter(|s| matches!(s.fault, Planned::Bridge { .. })).count())
            .sum();
        assert!(bridges >= 20, "{bridges} bridges in 20 plans of 5 nodes");
        for seed in 0..20 {
            assert!(plan(seed, profile(true)).iter().all(|s| !matches!(s.fault, Planned::Bridge { .. })));
            let no_partitions = Profile { partitions: false, ..five };
            assert!(plan(seed, no_partitions).iter().all(|s| !matches!(s.fault, Planned::Bridge { .. })));
        }
    }

    #[test]
    fn without_partitions_none_is_planned() {
        let steps = plan(7, profile(false));
        assert!(steps.iter().all(|s| !matches!(s.fault, Planned::Isolate { .. } | Planned::Lossy { .. })));
    }
}
