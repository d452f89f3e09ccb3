//! The independent checker of a chaos run.
//!
//! It reads only the files of a run directory ([`crate::history`]: `history.jsonl`,
//! `faults.jsonl`, `ledger.jsonl`, `final.jsonl`) and checks them against the contract:
//!
//! | invariant | required | what |
//! |---|---|---|
//! | `acknowledged_starts_kept` | yes | every flow whose start was acknowledged (`ok`) is in the final state |
//! | `input_kept` | no | the final input of such a flow is JSON-equal to every acknowledged start's input |
//! | `terminal_after_heal` | yes | every flow of the final state is `succeeded`, `failed` or `cancelled` |
//! | `order_effects_once` | yes | the ledger of each `order` is one the order flow can write (see [`check`]) |
//! | `no_refund_of_unknown_shipment` | no | an order whose shipment is unknown was not refunded |
//! | `unknown_outcome_in_fault_window` | no | an unknown shipment happened near a fault or an operator's change of that order |
//! | `messages_once_per_key` | no | no message key twice in a flow; every acknowledged send there once |
//! | `timers_not_early`, `timers_not_late` | no | a signup's first reminder neither before its interval nor later than faults explain |
//! | `loans_decided_on_their_log` | no | every loan succeeded with the decision its event log implies |
//! | `newsletters_at_least_once` | no | every newsletter mailed each recipient at least once, no one else, and counted each once |
//! | `messaging_orders_as_answered` | no | every message-driven order ended as its log and ledger say it must |
//! | `batches_complete` | no | every bulk batch's order started once as a child, its result delivered once, listed once as it ended |
//! | `sends_delivered_once` | no | every referral's message (a flow's send to a flow) is in its rewards account's log exactly once, and the account added up what it took |
//! | `single_activation` | yes | per flow, one node per epoch, and an older epoch makes at most one call (the one in flight) after a newer one's first |
//! | `control_ops_applied` | no | an acknowledged cancel ends the flow `cancelled`; an effect set done is not run again after the acknowledgement (bar the call in flight) |
//! | `replicas_agree`, `replicas_restored` | yes | after the heal: replicas with one digest; 3 replicas per shard on members |
//!
//! Each invariant counts the individual checks it made; a required invariant that checked
//! nothing fails the run (a run that checked nothing cannot pass). Optional invariants are the
//! ones the workload may not exercise in a given run (no unknown shipment, no message): they may
//! check nothing, but a violation of any invariant fails the run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Result;
use fetter_examples::ledger::LedgerEntry;
use serde_json::Value;

use fetter_examples::fakes::Email;

use crate::history::{
    self, ControlAction, DigestRecord, FaultRecord, FinalFlow, Op, OpRecord, Phase, PlacementRecord,
};

/// How many violations of one invariant [`CheckReport::summary`] shows.
const SUMMARY_VIOLATIONS: usize = 3;

/// The error kind of an at-most-once effect whose outcome was not recorded before a crash.
const EFFECT_OUTCOME_UNKNOWN: &str = "effect_outcome_unknown";
/// The error kind of an error a flow's effect returned (a fake service's [`Rejected`] answer).
///
/// [`Rejected`]: fetter_examples::fakes::ServiceError::Rejected
const ERROR: &str = "error";
/// How logistics' "no" reads in a failed order's message.
const LOGISTICS_REJECTED: &str = "logistics rejected the call";
/// How the email service's "no" reads in a failed order's message.
const EMAIL_REJECTED: &str = "email rejected the call";
/// A product id that makes logistics refuse a shipment starts with this.
const FAIL_SHIP_PREFIX: &str = "fail-ship";
/// The template of the order confirmation mail (ledger key `order-confirmation:<order id>`).
const ORDER_CONFIRMATION: &str = "order-confirmation";

/// Knobs of the checker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOptions {
    /// How far (ms) before a fault's start and after its end an unknown outcome still counts as
    /// inside the fault's window (clock skew, election timeouts, the time to notice a death).
    pub fault_slack_ms: u64,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions { fault_slack_ms: 5_000 }
    }
}

/// One invariant's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invariant {
    /// Its stable name, e.g. `acknowledged_starts_kept`.
    pub name: &'static str,
    /// Whether a run must exercise it (`checked > 0`) to pass.
    pub required: bool,
    /// How many individual checks it made.
    pub checked: u64,
    /// What it found wrong, one message each.
    pub violations: Vec<String>,
}

impl Invariant {
    fn new(name: &'static str, required: bool) -> Self {
        Invariant { name, required, checked: 0, violations: Vec::new() }
    }

    /// Counts one check, and a violation (`message()`) if `ok` is false.
    fn check(&mut self, ok: bool, message: impl FnOnce() -> String) {
        self.checked += 1;
        if !ok {
            self.violations.push(message());
        }
    }

    /// Whether this invariant lets the run pass.
    pub fn passed(&self) -> bool {
        self.violations.is_empty() && (self.checked > 0 || !self.required)
    }
}

/// What the checker found: every invariant, in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// The invariants.
    pub invariants: Vec<Invariant>,
}

impl CheckReport {
    /// Whether the run passed: no invariant has a violation and every required one checked
    /// something.
    pub fn passed(&self) -> bool {
        self.invariants.iter().all(Invariant::passed)
    }

    /// One line per invariant: its name, how often it was checked, how many violations it found
    /// and the first few of them.
    pub fn summary(&self) -> String {
        let mut lines = Vec::with_capacity(self.invariants.len());
        for inv in &self.invariants {
            let mut line = format!(
                "{} {}{}: checked {}, violations {}",
                if inv.passed() { "ok  " } else { "FAIL" },
                inv.name,
                if inv.required { "" } else { " (optional)" },
                inv.checked,
                inv.violations.len()
            );
            if inv.required && inv.checked == 0 {
                line.push_str(" (nothing checked)");
            }
            if !inv.violations.is_empty() {
                let first: Vec<&str> =
                    inv.violations.iter().take(SUMMARY_VIOLATIONS).map(String::as_str).collect();
                line.push_str(": ");
                line.push_str(&first.join("; "));
                if inv.violations.len() > SUMMARY_VIOLATIONS {
                    line.push_str("; …");
                }
            }
            lines.push(line);
        }
        lines.join("\n")
    }

    /// The invariant called `name`, if the report has it.
    pub fn invariant(&self, name: &str) -> Option<&Invariant> {
        self.invariants.iter().find(|i| i.name == name)
    }
}

/// The four files of a run directory: history, faults (as written: start and end lines apart),
/// ledger and final state.
pub type RunFiles = (Vec<OpRecord>, Vec<FaultRecord>, Vec<LedgerEntry>, Vec<FinalFlow>);

/// Reads a run directory's [`RunFiles`]. A missing file reads as empty.
pub fn load(dir: &Path) -> Result<RunFiles> {
    Ok((
        history::read_lines(&dir.join(history::HISTORY))?,
        history::read_lines(&dir.join(history::FAULTS))?,
        history::read_lines(&dir.join(history::LEDGER))?,
        history::read_lines(&dir.join(history::FINAL))?,
    ))
}

/// Loads the run directory `dir` and [`check`]s it, with [`check_replicas`] over its digests.
pub fn check_dir(dir: &Path, opts: &CheckOptions) -> Result<CheckReport> {
    let (history, faults, ledger, finals) = load(dir)?;
    let mut report = check(&history, &faults, &ledger, &finals, opts);
    report.invariants.push(check_timers_not_early(&ledger, &finals));
    report.invariants.push(check_timers_not_late(&ledger, &finals, &faults, opts.fault_slack_ms));
    report.invariants.push(check_loans(&finals));
    report.invariants.push(check_batches(&finals));
    report.invariants.push(check_newsletters(&ledger, &finals));
    report.invariants.push(check_messaging_orders(&ledger, &finals));
    report.invariants.push(check_sends(&finals));
    report.invariants.push(check_single_activation(&ledger));
    report.invariants.push(check_control_ops(&history, &ledger, &finals));
    let digests: Vec<DigestRecord> = history::read_lines(&dir.join(history::DIGESTS))?;
    report.invariants.push(check_replicas(&digests));
    let placement: Vec<PlacementRecord> = history::read_lines(&dir.join(history::PLACEMENT))?;
    report.invariants.push(check_placement(&placement));
    Ok(report)
}

/// `sends_delivered_once` (optional): messages between flows arrive exactly once. Each
/// `referral` flow (examples/src/flows/referral.rs) sends one `Referred` message, keyed by its
/// own id, to the `rewards` account its input names; the account takes as many as its input
/// says and adds up their points. So: every succeeded referral's message is in its account's log
/// exactly once; the log holds no `Referred` message but from a succeeded referral of that
/// account; and a succeeded account's output is the sum and the senders of the messages it took
/// (the first ones of its log). Checked once per referral and once per account output.
pub fn check_sends(finals: &[FinalFlow]) -> Invariant {
    let mut inv = Invariant::new("sends_delivered_once", false);
    let mut referrals: BTreeMap<String, Vec<&FinalFlow>> = BTreeMap::new();
    for f in finals.iter().filter(|f| f.flow.starts_with("referral/") && f.status == "succeeded") {
        let input: Option<Value> = serde_json::from_str(&f.input).ok();
        if let Some(account) = input.as_ref().and_then(|i| i.get("rewards")).and_then(Value::as_str) {
            referrals.entry(format!("rewards/{account}")).or_default().push(f);
        }
    }
    for account in finals.iter().filter(|f| f.flow.starts_with("rewards/")) {
        let taken: Vec<(String, u64)> = account
            .messages
            .iter()
            .filter(|(kind, _)| kind == "Referred")
            .filter_map(|(_, payload)| {
                let v: Value = serde_json::from_str(payload).ok()?;
                Some((v.get("from")?.as_str()?.to_string(), v.get("points")?.as_u64()?))
            })
            .collect();
        let senders = referrals.get(&account.flow).map(Vec::as_slice).unwrap_or_default();
        for referral in senders {
            let n = taken.iter().filter(|(from, _)| *from == referral.flow).count();
            inv.check(n == 1, || {
                format!("{}: its message is in {}'s log {n} times", referral.flow, account.flow)
            });
        }
        for (from, _) in &taken {
            if !senders.iter().any(|r| r.flow == *from) {
                inv.check(false, || {
                    format!(
                        "{}: a message from {from}, which is not a succeeded referral of it",
                        account.flow
                    )
                });
            }
        }
        if account.status == "succeeded" {
            let wanted: Option<u64> = serde_json::from_str::<Value>(&account.input)
                .ok()
                .and_then(|i| i.get("referrals").and_then(Value::as_u64));
            let first = &taken[..taken.len().min(wanted.unwrap_or(0) as usize)];
            let output: Option<Value> = account.output.as_deref().and_then(|o| serde_json::from_str(o).ok());
            let points = output.as_ref().and_then(|o| o.get("points")).and_then(Value::as_u64);
            let from: Option<Vec<&str>> = output
                .as_ref()
                .and_then(|o| o.get("from"))
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect());
            let expected_from: Vec<&str> = first.iter().map(|(f, _)| f.as_str()).collect();
            let expected_points: u64 = first.iter().map(|(_, p)| p).sum();
            inv.check(points == Some(expected_points) && from.as_ref() == Some(&expected_from), || {
                format!(
                    "{}: output {:?}, but the first {} message(s) of its log come from {expected_from:?} with {expected_points} points",
                    account.flow,
                    account.output,
                    first.len()
                )
            });
        }
    }
    inv
}

/// `single_activation` (required): two activations of a flow never ran its effects at once.
/// Every call a fake service gets from a flow's activation carries that activation's epoch (a
/// fencing token, [`fetter::activation::current`]). Per flow: each epoch's calls come from one
/// node; and once a call of a newer epoch was made, an older epoch makes at most one more call
/// (its effect in flight when it was superseded: between two effects an activation always
/// commits — the pending result, the `Started` of an at-most-once effect — and that commit is
/// refused, which ends it). Checked once per (flow, epoch). Newsletters are left out: they mail
/// outside effects, a checkpoint's worth per commit (at least once by design).
pub fn check_single_activation(ledger: &[LedgerEntry]) -> Invariant {
    let mut inv = Invariant::new("single_activation", true);
    let mut by_flow: BTreeMap<&str, Vec<&LedgerEntry>> = BTreeMap::new();
    for e in ledger.iter().filter(|e| e.epoch.is_some() && !e.flow.starts_with("newsletter/")) {
        by_flow.entry(e.flow.as_str()).or_default().push(e);
    }
    for (flow, mut entries) in by_flow {
        entries.sort_by_key(|e| e.ts_ms);
        let mut epochs: BTreeMap<u64, (BTreeSet<u64>, Vec<&LedgerEntry>)> = BTreeMap::new();
        for e in &entries {
            let slot = epochs.entry(e.epoch.unwrap_or_default()).or_default();
            slot.0.insert(e.node);
            slot.1.push(e);
        }
        for (epoch, (nodes, calls)) in &epochs {
            // The first call of any newer epoch.
            let superseded =
                epochs.range(epoch + 1..).filter_map(|(_, (_, c))| c.first().map(|e| e.ts_ms)).min();
            let after: Vec<&&LedgerEntry> = match superseded {
                Some(t) => calls.iter().filter(|e| e.ts_ms > t).collect(),
                None => Vec::new(),
            };
            inv.check(nodes.len() == 1 && after.len() <= 1, || {
                if nodes.len() > 1 {
                    format!("{flow}: epoch {epoch} made calls from nodes {nodes:?}")
                } else {
                    let calls: Vec<String> =
                        after.iter().map(|e| format!("{} {} at {}", e.service, e.op, e.ts_ms)).collect();
                    format!(
                        "{flow}: epoch {epoch} (node {nodes:?}) made {} calls after a newer epoch's first call at {}: {}",
                        after.len(),
                        superseded.unwrap_or_default(),
                        calls.join(", ")
                    )
                }
            });
        }
    }
    inv
}

/// `control_ops_applied` (optional): what an operator's acknowledged control-panel operation
/// promises. A cancelled flow ends `cancelled` and makes at most one call after the cancel was
/// acknowledged (its effect in flight); an order whose confirmation mail was set done sends at
/// most that one in-flight mail after the set was acknowledged. (A restart keeps the recorded
/// effects: `order_effects_once` and `single_activation` check what follows it.)
pub fn check_control_ops(history: &[OpRecord], ledger: &[LedgerEntry], finals: &[FinalFlow]) -> Invariant {
    let mut inv = Invariant::new("control_ops_applied", false);
    let finals_by_flow: BTreeMap<&str, &FinalFlow> = finals.iter().map(|f| (f.flow.as_str(), f)).collect();
    for r in history.iter().filter(|r| r.phase == Phase::Ok) {
        let Op::Control { action, .. } = &r.op else { continue };
        let flow = r.op.flow();
        let later = |what: &dyn Fn(&LedgerEntry) -> bool| {
            ledger.iter().filter(|e| e.flow == flow && e.ts_ms > r.t_ms && what(e)).count()
        };
        match action {
            ControlAction::Cancel => {
                let status = finals_by_flow.get(flow.as_str()).map(|f| f.status.as_str());
                let calls = later(&|_| true);
                inv.check(status == Some("cancelled") && calls <= 1, || {
                    format!(
                        "{flow}: cancel acknowledged (op {}) but it ended {status:?} with {calls} call(s) after it",
                        r.id
                    )
                });
            }
            ControlAction::SetEffect { effect_id, .. } if effect_id == "email" => {
                let mails = later(&|e| e.service == Email::SERVICE && e.key.starts_with(ORDER_CONFIRMATION));
                inv.check(mails <= 1, || {
                    format!(
                        "{flow}: its mail was set done (op {}) but it mailed {mails} time(s) after that",
                        r.id
                    )
                });
            }
            ControlAction::SetEffect { .. } | ControlAction::Restart => {}
        }
    }
    inv
}

/// `replicas_restored` (required): after the final heal every shard has a leader and
/// `min(3, members)` replicas, all of them current members (a lost node's replicas moved to the
/// others and to its successor).
pub fn check_placement(placement: &[PlacementRecord]) -> Invariant {
    let mut inv = Invariant::new("replicas_restored", true);
    for p in placement {
        let wanted = 3.min(p.members.len());
        let on_members = p.replicas.iter().all(|r| p.members.contains(r));
        inv.check(p.leader.is_some() && p.replicas.len() == wanted && on_members, || {
            format!(
                "shard {}: leader {:?}, replicas {:?} with members {:?} (wanted {wanted} replicas, all members)",
                p.shard, p.leader, p.replicas, p.members
            )
        });
    }
    inv
}

/// A signup's first reminder as the ledger shows it: the first and last call of its activation
/// mail, its first reminder, and its reminder interval.
struct FirstReminder<'a> {
    flow: &'a str,
    activation_first: u64,
    activation_last: u64,
    reminder: u64,
    interval: u64,
}

/// Every signup of `finals` that sent a reminder, with its [`FirstReminder`].
fn first_reminders<'a>(ledger: &'a [LedgerEntry], finals: &'a [FinalFlow]) -> Vec<FirstReminder<'a>> {
    let mut mails: BTreeMap<&str, Vec<&LedgerEntry>> = BTreeMap::new();
    for e in ledger.iter().filter(|e| e.service == Email::SERVICE && e.op == Email::SEND) {
        mails.entry(e.flow.as_str()).or_default().push(e);
    }
    let mut out = Vec::new();
    for f in finals.iter().filter(|f| f.flow.starts_with("signup/")) {
        let Ok(input) = serde_json::from_str::<Value>(&f.input) else { continue };
        let (Some(customer), Some(interval)) = (
            input.get("customer_id").and_then(Value::as_str),
            input.get("reminder_interval_ms").and_then(Value::as_u64),
        ) else {
            continue;
        };
        let entries = mails.get(f.flow.as_str()).map(Vec::as_slice).unwrap_or_default();
        let calls = |template: &str| {
            let key = Email::key_of(template, customer);
            let times: Vec<u64> = entries.iter().filter(|e| e.key == key).map(|e| e.ts_ms).collect();
            times.iter().min().copied().zip(times.iter().max().copied())
        };
        let (Some((activation_first, activation_last)), Some((reminder, _))) =
            (calls(Email::ACTIVATION), calls(Email::REMINDER))
        else {
            continue;
        };
        out.push(FirstReminder { flow: &f.flow, activation_first, activation_last, reminder, interval });
    }
    out
}

/// `timers_not_early` (optional): a signup's first reminder comes at least its reminder
/// interval after its first activation mail. The reminder is sent when the timer `verify-0`
/// fires, and that timer is armed (deadline: now + interval) only after the activation mail's
/// effect completed, which is after the mail's first call; so a first reminder earlier than
/// that means a timer fired before its deadline. (Later reminders cannot be told apart in the
/// ledger: they share one key, and an at-least-once mail may be sent again after a crash.)
pub fn check_timers_not_early(ledger: &[LedgerEntry], finals: &[FinalFlow]) -> Invariant {
    let mut inv = Invariant::new("timers_not_early", false);
    for r in first_reminders(ledger, finals) {
        inv.check(r.reminder >= r.activation_first + r.interval, || {
            format!(
                "{}: first reminder {} ms after the activation mail, before the {} ms interval",
                r.flow,
                r.reminder.saturating_sub(r.activation_first),
                r.interval
            )
        });
    }
    inv
}

/// `timers_not_late` (optional): a signup's first reminder comes at most `slack_ms` after its
/// timer's deadline, not counting the time faults were active in between (a shard may have had
/// no leader then). The deadline is at most the interval after the activation mail's last call
/// (the timer is armed once the mail's effect is journaled, just after its last call), so a
/// reminder later than that, beyond what the faults explain, is a timer that fired late or not
/// at all until something else woke its flow.
pub fn check_timers_not_late(
    ledger: &[LedgerEntry],
    finals: &[FinalFlow],
    faults: &[FaultRecord],
    slack_ms: u64,
) -> Invariant {
    let mut inv = Invariant::new("timers_not_late", false);
    let mut windows: Vec<(u64, u64)> =
        history::merge_faults(faults).iter().map(|f| (f.start_ms, f.end_ms.unwrap_or(u64::MAX))).collect();
    windows.sort_unstable();
    for r in first_reminders(ledger, finals) {
        let deadline = r.activation_last + r.interval;
        // The time within [deadline, reminder] covered by at least one fault.
        let (mut faulty, mut covered_to) = (0, deadline);
        for &(start, end) in &windows {
            let (from, to) = (start.max(covered_to), end.min(r.reminder));
            if to > from {
                faulty += to - from;
                covered_to = to;
            }
        }
        let late = r.reminder.saturating_sub(deadline);
        inv.check(late <= faulty + slack_ms, || {
            format!(
                "{}: first reminder {late} ms after its timer's deadline, {faulty} ms of it under faults (bound: {slack_ms} ms more)",
                r.flow
            )
        });
    }
    inv
}

/// `loans_decided_on_their_log` (optional): every loan application succeeded with the decision
/// its own event log implies. The loan flow's contract (examples/src/flows/loan.rs): it asks
/// bureaus `bureau-a`, `-b` and `-c`, then takes up to three `CreditCheckOutcome` messages from
/// its log until its window's timer `replies` fires; of those, each asked bureau's first reply
/// counts; rejected if a counted reply rejects or fewer than two count, approved otherwise. So
/// the messages it took are the first (up to three) before the `replies` firing in its log, or
/// the first three if the timer never fired; a decision on anything else (a replay that saw
/// other messages, a reply counted twice or after the window) is a violation.
pub fn check_loans(finals: &[FinalFlow]) -> Invariant {
    const ASKED: [&str; 3] = ["bureau-a", "bureau-b", "bureau-c"];
    let mut inv = Invariant::new("loans_decided_on_their_log", false);
    for f in finals.iter().filter(|f| f.flow.starts_with("loan/")) {
        let fired = f.fired.iter().find(|(timer, _)| timer == "replies").map(|(_, before)| *before);
        let replies: Vec<(String, bool)> = f.messages
            [..fired.unwrap_or(f.messages.len()).min(f.messages.len())]
            .iter()
            .filter(|(kind, _)| kind == "CreditCheckOutcome")
            .filter_map(|(_, payload)| {
                let v: Value = serde_json::from_str(payload).ok()?;
                Some((v.get("bureau")?.as_str()?.to_string(), v.get("approved")?.as_bool()?))
            })
            .take(3)
            .collect();
        if f.status != "succeeded" {
            inv.check(false, || format!("{}: {} ({:?}), a loan always succeeds", f.flow, f.status, f.error));
            continue;
        }
        if fired.is_none() && replies.len() < 3 {
            inv.check(false, || {
                format!("{}: decided on {} replies without its window closing", f.flow, replies.len())
            });
            continue;
        }
        let mut counted: Vec<&(String, bool)> = Vec::new();
        for reply in &replies {
            if ASKED.contains(&reply.0.as_str()) && !counted.iter().any(|c| c.0 == reply.0) {
                counted.push(reply);
            }
        }
        let approved = counted.len() >= 2 && counted.iter().all(|c| c.1);
        let output: Option<Value> = f.output.as_deref().and_then(|o| serde_json::from_str(o).ok());
        let got =
            output.as_ref().and_then(|o| Some((o.get("approved")?.as_bool()?, o.get("replies")?.as_u64()?)));
        inv.check(got == Some((approved, counted.len() as u64)), || {
            format!(
                "{}: decided {:?}, but its log implies approved {approved} on {} replies ({replies:?})",
                f.flow,
                f.output,
                counted.len()
            )
        });
    }
    inv
}

/// `batches_complete` (optional): every `bulk-orders` batch succeeded; each of its orders
/// was started once as the child flow `order/<order_id>` (it is in the final state, terminal,
/// with the order as its input) and its result reached the batch once (one child result in the
/// batch's log); the batch's output lists each order exactly once, under `succeeded` exactly
/// when its child succeeded, else under `failed` with the child's error kind.
pub fn check_batches(finals: &[FinalFlow]) -> Invariant {
    let mut inv = Invariant::new("batches_complete", false);
    let by_flow: BTreeMap<&str, &FinalFlow> = finals.iter().map(|f| (f.flow.as_str(), f)).collect();
    for f in finals.iter().filter(|f| f.flow.starts_with("bulk-orders/")) {
        let Ok(input) = serde_json::from_str::<Value>(&f.input) else { continue };
        let orders: Vec<(String, &Value)> = input
            .get("orders")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|o| Some((o.get("order_id")?.as_str()?.to_string(), o))).collect())
            .unwrap_or_default();
        if f.status != "succeeded" {
            inv.check(false, || {
                format!("{}: {} ({:?}), a batch of valid orders succeeds", f.flow, f.status, f.error)
            });
            continue;
        }
        let output: Value =
            f.output.as_deref().and_then(|o| serde_json::from_str(o).ok()).unwrap_or_default();
        let ids = |key: &str, field: Option<&str>| -> Vec<String> {
            output
                .get(key)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| match field {
                            Some(field) => v.get(field)?.as_str().map(str::to_owned),
                            None => v.as_str().map(str::to_owned),
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let succeeded = ids("succeeded", None);
        let failed = ids("failed", Some("order_id"));
        for (id, order) in &orders {
            let child = format!("order/{id}");
            let results = f.child_results.iter().filter(|c| **c == child).count();
            let listed =
                succeeded.iter().filter(|s| *s == id).count() + failed.iter().filter(|s| *s == id).count();
            let Some(final_child) = by_flow.get(child.as_str()) else {
                inv.check(false, || format!("{}: its order {id} has no child flow {child}", f.flow));
                continue;
            };
            let same_input = serde_json::from_str::<Value>(&final_child.input).ok().as_ref() == Some(*order);
            let agrees = if succeeded.contains(id) {
                final_child.status == "succeeded"
            } else {
                final_child.status != "succeeded" && history::terminal(&final_child.status)
            };
            inv.check(results == 1 && listed == 1 && same_input && agrees, || {
                format!(
                    "{}: order {id}: {results} child result(s) in its log, listed {listed} time(s) in its output, \
                     child {} (input kept: {same_input})",
                    f.flow, final_child.status
                )
            });
        }
        inv.check(succeeded.len() + failed.len() == orders.len(), || {
            format!(
                "{}: {} orders, {} listed in its output",
                f.flow,
                orders.len(),
                succeeded.len() + failed.len()
            )
        });
    }
    inv
}

/// `newsletters_at_least_once` (optional): every newsletter succeeded, mailed each of its
/// recipients at least once (ledger key `newsletter:<address>`, under its own flow) and no one
/// else, and its output counts each recipient once (its position is journaled: a replay may mail
/// the recipients since the last checkpoint again, but never counts them twice).
pub fn check_newsletters(ledger: &[LedgerEntry], finals: &[FinalFlow]) -> Invariant {
    let mut inv = Invariant::new("newsletters_at_least_once", false);
    let mut mails: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    for e in ledger.iter().filter(|e| e.service == Email::SERVICE && e.op == Email::SEND) {
        *mails.entry(e.flow.as_str()).or_default().entry(e.key.as_str()).or_default() += 1;
    }
    for f in finals.iter().filter(|f| f.flow.starts_with("newsletter/")) {
        let Ok(input) = serde_json::from_str::<Value>(&f.input) else { continue };
        let recipients: Vec<&str> = input
            .get("recipients")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).filter(|r| !r.is_empty()).collect())
            .unwrap_or_default();
        let sent = mails.get(f.flow.as_str()).cloned().unwrap_or_default();
        let keys: BTreeSet<String> = recipients.iter().map(|r| Email::key_of(Email::NEWSLETTER, r)).collect();
        let missing: Vec<&String> = keys.iter().filter(|k| !sent.contains_key(k.as_str())).collect();
        let strangers: Vec<&&str> = sent.keys().filter(|k| !keys.contains(**k)).collect();
        let output = f.output.as_deref().and_then(|o| o.trim().parse::<u64>().ok());
        inv.check(
            f.status == "succeeded"
                && missing.is_empty()
                && strangers.is_empty()
                && output == Some(recipients.len() as u64),
            || {
                format!(
                    "{}: {} ({:?}), output {:?} for {} recipients, never mailed {missing:?}, mailed outside the list {strangers:?}",
                    f.flow,
                    f.status,
                    f.error,
                    f.output,
                    recipients.len()
                )
            },
        );
    }
    inv
}

/// `messaging_orders_as_answered` (optional): every message-driven order (`order-messaging`,
/// the harness playing payments and logistics) ended as its log and ledger say it must (the
/// flow's contract, examples/src/flows/order_messaging.rs): succeeded with the tracking id of
/// the `ProductsShipped` in its log, shipped once, the reserved transaction captured, confirmed,
/// nothing refunded; or failed `shipment_failed` (a `ShipmentFailed` and no `ProductsShipped` in
/// its log) or `shipment_timeout` (neither), shipped once, refunded, never captured nor
/// confirmed; or failed `effect_outcome_unknown` (its ship request interrupted), shipped at
/// most once, never captured nor confirmed.
pub fn check_messaging_orders(ledger: &[LedgerEntry], finals: &[FinalFlow]) -> Invariant {
    let mut inv = Invariant::new("messaging_orders_as_answered", false);
    let mut by_flow: BTreeMap<&str, Vec<&LedgerEntry>> = BTreeMap::new();
    for e in ledger {
        by_flow.entry(e.flow.as_str()).or_default().push(e);
    }
    for f in finals.iter().filter(|f| f.flow.starts_with("order-messaging/")) {
        let order_id = f.flow.trim_start_matches("order-messaging/");
        let l =
            OrderLedger::of(by_flow.get(f.flow.as_str()).map(Vec::as_slice).unwrap_or_default(), order_id);
        let message = |kind: &str| -> Option<Value> {
            f.messages.iter().find(|(t, _)| t == kind).and_then(|(_, p)| serde_json::from_str(p).ok())
        };
        let shipped = message("ProductsShipped");
        let one_tx = l.transactions.len() == 1;
        let ok = match (f.status.as_str(), f.error_kind.as_deref()) {
            ("succeeded", _) => {
                let tracking = shipped.as_ref().and_then(|p| p.get("tracking_id")).and_then(Value::as_str);
                let output: Option<Value> = f.output.as_deref().and_then(|o| serde_json::from_str(o).ok());
                let got = output.as_ref().and_then(|o| o.get("tracking_id")).and_then(Value::as_str);
                tracking.is_some()
                    && got == tracking
                    && l.ships == 1
                    && one_tx
                    && l.captured == l.reserved
                    && l.confirmations >= 1
                    && l.cancels == 0
            }
            ("failed", Some(kind @ ("shipment_failed" | "shipment_timeout"))) => {
                let reported = message("ShipmentFailed").is_some();
                shipped.is_none()
                    && reported == (kind == "shipment_failed")
                    && l.ships == 1
                    && one_tx
                    && l.cancels >= 1
                    && l.captured.is_empty()
                    && l.confirmations == 0
            }
            ("failed", Some("effect_outcome_unknown")) => {
                l.ships <= 1 && l.captured.is_empty() && l.confirmations == 0
            }
            _ => false,
        };
        inv.check(ok, || {
            format!(
                "{}: {} {:?} ({:?}), output {:?}, log {:?}; ledger: {} ship(s), reserved {:?}, captured {:?}, {} refund(s), {} confirmation(s)",
                f.flow,
                f.status,
                f.error_kind,
                f.error,
                f.output,
                f.messages.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
                l.ships,
                l.reserved,
                l.captured,
                l.cancels,
                l.confirmations
            )
        });
    }
    inv
}

/// `replicas_agree` (required): after the final heal, every shard's replicas report the same
/// applied index, each read while nothing was applied, and the same digest of their state.
pub fn check_replicas(digests: &[DigestRecord]) -> Invariant {
    let mut inv = Invariant::new("replicas_agree", true);
    let mut by_shard: BTreeMap<u32, Vec<&DigestRecord>> = BTreeMap::new();
    for d in digests {
        by_shard.entry(d.shard).or_default().push(d);
    }
    for (shard, replicas) in by_shard {
        let Some(first) = replicas.first() else { continue };
        let describe = || {
            replicas
                .iter()
                .map(|d| {
                    format!(
                        "n{}@{}{}:{}",
                        d.node,
                        d.applied_index,
                        if d.stable { "" } else { "(moving)" },
                        d.digest
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let settled = replicas.iter().all(|d| d.stable && d.applied_index == first.applied_index);
        inv.check(settled, || {
            format!("shard {shard}: replicas never settled at one applied index: {}", describe())
        });
        if settled {
            let same = replicas.iter().all(|d| d.digest == first.digest && d.rows == first.rows);
            inv.check(same, || {
                format!("shard {shard}: replicas at index {} differ: {}", first.applied_index, describe())
            });
        }
    }
    inv
}

/// The `"key"` of a message payload, if it is a JSON object with a string `key`.
fn payload_key(payload: &str) -> Option<String> {
    serde_json::from_str::<Value>(payload).ok()?.get("key")?.as_str().map(str::to_owned)
}

/// Checks a run. Every invariant counts each individual check it makes.
///
/// # The ledger of an `order` (examples/src/flows/order.rs)
///
/// The flow captures a transaction id `tx` (a journaled UUID), then calls, as effects:
/// `payment`/`reserve` (key `tx`, at least once); `logistics`/`ship` (key the order id, **at most
/// once**); on success `payment`/`capture` (key `tx`) and `email`/`send` (key
/// `order-confirmation:<order id>`), both at least once; when logistics says "no",
/// `payment`/`cancel` (key `tx`: the refund, at least once) and the flow fails with that answer.
///
/// So every order's payment calls carry one transaction id, and it ships at most once. An
/// at-least-once effect may legitimately be called again by a replay after a crash between the
/// call and its journal entry, with the same `tx` (the provider's idempotency key): "captured
/// exactly once" therefore means exactly one transaction captured, the reserved one — not one
/// ledger line.
///
/// # Failed orders: the accepted kinds
///
/// The fakes never decline a payment (every `reserve`/`capture`/`cancel` succeeds), so a failed
/// order is accepted only as one of:
///
/// - `effect_outcome_unknown` naming the `ship` effect (the flow's only at-most-once effect: a
///   crash after its `Started` marker): shipped at most once, never captured, no confirmation
///   mail. (That it was not refunded is `no_refund_of_unknown_shipment`'s business.)
/// - `error` with logistics' "no" (`logistics rejected the call: …`), which logistics answers
///   only for a product id starting with `fail-ship`: the input must have such a product; shipped
///   (the call is recorded) exactly once, refunded (`cancel` of the reserved transaction), never
///   captured.
/// - `error` with the email service's "no" (`email rejected the call: …`), which it answers only
///   for an empty recipient (the customer id): the input's customer id must be empty; shipped
///   exactly once and captured.
///
/// Anything else fails the check: another kind (`panic`, `replay_drift`, `bad_input`, …), or an
/// `error` that is not a service's "no" — e.g. `ledger: …`, a fake that could not record its
/// call, so the ledger cannot vouch for the effect.
pub fn check(
    history: &[OpRecord],
    faults: &[FaultRecord],
    ledger: &[LedgerEntry],
    finals: &[FinalFlow],
    opts: &CheckOptions,
) -> CheckReport {
    let finals_by_flow: BTreeMap<&str, &FinalFlow> = finals.iter().map(|f| (f.flow.as_str(), f)).collect();
    let mut ledger_by_flow: BTreeMap<&str, Vec<&LedgerEntry>> = BTreeMap::new();
    for e in ledger {
        ledger_by_flow.entry(e.flow.as_str()).or_default().push(e);
    }
    let oks: Vec<&OpRecord> = history.iter().filter(|r| r.phase == Phase::Ok).collect();

    let mut starts_kept = Invariant::new("acknowledged_starts_kept", true);
    let mut input_kept = Invariant::new("input_kept", false);
    let mut terminal_inv = Invariant::new("terminal_after_heal", true);
    let mut effects_once = Invariant::new("order_effects_once", true);
    let mut no_refund = Invariant::new("no_refund_of_unknown_shipment", false);
    let mut in_window = Invariant::new("unknown_outcome_in_fault_window", false);
    let mut messages_once = Invariant::new("messages_once_per_key", false);

    // 1 and 2: acknowledged starts are kept, with their input.
    let mut started: BTreeSet<String> = BTreeSet::new();
    for r in &oks {
        let Op::Start { input, .. } = &r.op else { continue };
        let flow = r.op.flow();
        if started.insert(flow.clone()) {
            starts_kept.check(finals_by_flow.contains_key(flow.as_str()), || {
                format!("{flow}: its start was acknowledged (op {}) but it is not in the final state", r.id)
            });
        }
        let Some(last) = finals_by_flow.get(flow.as_str()) else { continue };
        let acked = serde_json::from_str::<Value>(input);
        let kept = serde_json::from_str::<Value>(&last.input);
        input_kept.check(matches!((&acked, &kept), (Ok(a), Ok(k)) if a == k), || match (acked, kept) {
            (Err(e), _) => format!("{flow}: the acknowledged input (op {}) is not JSON ({e}): {input}", r.id),
            (_, Err(e)) => format!("{flow}: the final input is not JSON ({e}): {}", last.input),
            _ => format!(
                "{flow}: acknowledged input (op {}) {input} but the final input is {}",
                r.id, last.input
            ),
        });
    }

    // 3: every flow of the final state is terminal (one acknowledged but missing is 1's business).
    for f in finals {
        terminal_inv.check(history::terminal(&f.status), || {
            format!("{}: status {:?} after the final heal, not terminal", f.flow, f.status)
        });
    }

    // 4, 5, 6: orders.
    let windows = history::merge_faults(faults);
    let none: Vec<&LedgerEntry> = Vec::new();
    // Orders whose confirmation mail an operator may have set done (acknowledged or unknown).
    let mail_set: BTreeSet<String> = history
        .iter()
        .filter(|r| matches!(r.phase, Phase::Ok | Phase::Info))
        .filter(|r| matches!(&r.op, Op::Control { action: ControlAction::SetEffect { effect_id, .. }, .. } if effect_id == "email"))
        .map(|r| r.op.flow())
        .collect();
    // When control-panel operations that may have fenced a flow ran: (invoke, outcome) times.
    let mut invoked: BTreeMap<u64, u64> = BTreeMap::new();
    let mut operated: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for r in history.iter().filter(|r| matches!(r.op, Op::Control { .. })) {
        match r.phase {
            Phase::Invoke => {
                invoked.insert(r.id, r.t_ms);
            }
            Phase::Ok | Phase::Info => {
                let from = invoked.get(&r.id).copied().unwrap_or(r.t_ms);
                operated.entry(r.op.flow()).or_default().push((from, r.t_ms));
            }
            Phase::Fail => {}
        }
    }
    for f in finals.iter().filter(|f| f.flow.starts_with("order/")) {
        let entries = ledger_by_flow.get(f.flow.as_str()).unwrap_or(&none);
        check_order(f, entries, mail_set.contains(&f.flow), &mut effects_once);
        if f.status == "failed" && f.error_kind.as_deref() == Some(EFFECT_OUTCOME_UNKNOWN) {
            let refunds = entries.iter().filter(|e| e.service == "payment" && e.op == "cancel").count();
            no_refund.check(refunds == 0, || {
                format!(
                    "{}: failed {EFFECT_OUTCOME_UNKNOWN} (it may have shipped) but its payment was cancelled \
                     (refunded) {refunds} time(s)",
                    f.flow
                )
            });
            let operated = operated.get(f.flow.as_str()).map(Vec::as_slice).unwrap_or_default();
            check_unknown_in_window(f, entries, &windows, operated, opts.fault_slack_ms, &mut in_window);
        }
    }

    // 7: messages once per key; every acknowledged send there once.
    for f in finals {
        let mut keys: BTreeMap<String, usize> = BTreeMap::new();
        for (_, payload) in &f.messages {
            if let Some(key) = payload_key(payload) {
                *keys.entry(key).or_default() += 1;
            }
        }
        for (key, n) in &keys {
            messages_once.check(*n == 1, || {
                format!("{}: message key {key:?} appears {n} times among its messages", f.flow)
            });
        }
    }
    let mut sent: BTreeSet<(String, String)> = BTreeSet::new();
    for r in &oks {
        let Op::Send { message_type, key, .. } = &r.op else { continue };
        let flow = r.op.flow();
        let Some(last) = finals_by_flow.get(flow.as_str()) else { continue };
        if !sent.insert((flow.clone(), key.clone())) {
            continue;
        }
        let found: Vec<&str> = last
            .messages
            .iter()
            .filter(|(_, p)| payload_key(p).as_deref() == Some(key.as_str()))
            .map(|(t, _)| t.as_str())
            .collect();
        messages_once.check(found.len() == 1 && found[0] == message_type, || {
            format!(
                "{flow}: acknowledged send of {message_type} with key {key:?} (op {}) found {} time(s) among \
                 its messages (types {found:?})",
                r.id,
                found.len()
            )
        });
    }

    CheckReport {
        invariants: vec![
            starts_kept,
            input_kept,
            terminal_inv,
            effects_once,
            no_refund,
            in_window,
            messages_once,
        ],
    }
}

/// Counts of an order's ledger entries.
struct OrderLedger {
    ships: usize,
    reserved: BTreeSet<String>,
    captured: BTreeSet<String>,
    cancels: usize,
    transactions: BTreeSet<String>,
    confirmations: usize,
}

impl OrderLedger {
    fn of(entries: &[&LedgerEntry], order_id: &str) -> Self {
        let mut l = OrderLedger {
            ships: 0,
            reserved: BTreeSet::new(),
            captured: BTreeSet::new(),
            cancels: 0,
            transactions: BTreeSet::new(),
            confirmations: 0,
        };
        let confirmation = format!("{ORDER_CONFIRMATION}:{order_id}");
        for e in entries {
            match (e.service.as_str(), e.op.as_str()) {
                ("logistics", "ship") => l.ships += 1,
                ("payment", op) => {
                    l.transactions.insert(e.key.clone());
                    match op {
                        "reserve" => {
                            l.reserved.insert(e.key.clone());
                        }
                        "capture" => {
                            l.captured.insert(e.key.clone());
                        }
                        "cancel" => l.cancels += 1,
                        _ => {}
                    }
                }
                ("email", "send") if e.key == confirmation => l.confirmations += 1,
                _ => {}
            }
        }
        l
    }
}

/// How a failed order failed, as far as the order flow can fail.
enum OrderFailure {
    /// `effect_outcome_unknown` on the `ship` step.
    UnknownShipment,
    /// Logistics said no.
    Refused,
    /// The confirmation mail was refused.
    MailRefused,
}

/// The `order_effects_once` checks of one order (see [`check`]).
/// `mail_set`: an operator may have set the confirmation mail's effect done, so a succeeded
/// order need not have mailed.
fn check_order(f: &FinalFlow, entries: &[&LedgerEntry], mail_set: bool, inv: &mut Invariant) {
    let flow = f.flow.as_str();
    let input: Option<Value> = serde_json::from_str(&f.input).ok();
    let instance = flow.strip_prefix("order/").unwrap_or(flow);
    let order_id = input.as_ref().and_then(|i| i.get("order_id")).and_then(Value::as_str).unwrap_or(instance);
    let l = OrderLedger::of(entries, order_id);
    let message = f.error.as_deref().unwrap_or("");
    let kind = f.error_kind.as_deref().unwrap_or("");

    let failure = if f.status == "failed" {
        let products: Vec<&str> = input
            .as_ref()
            .and_then(|i| i.get("products"))
            .and_then(Value::as_array)
            .map(|ps| ps.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let customer = input.as_ref().and_then(|i| i.get("customer_id")).and_then(Value::as_str);
        let failure = match kind {
            EFFECT_OUTCOME_UNKNOWN if message.contains("\"ship\"") => Some(OrderFailure::UnknownShipment),
            ERROR
                if message.starts_with(LOGISTICS_REJECTED)
                    && products.iter().any(|p| p.starts_with(FAIL_SHIP_PREFIX)) =>
            {
                Some(OrderFailure::Refused)
            }
            ERROR if message.starts_with(EMAIL_REJECTED) && customer == Some("") => {
                Some(OrderFailure::MailRefused)
            }
            _ => None,
        };
        inv.check(failure.is_some(), || {
            format!(
                "{flow}: failed with kind {kind:?} ({message:?}), which the order flow cannot produce here \
                 (products {products:?}, customer {customer:?})"
            )
        });
        failure
    } else {
        None
    };

    // Shipped at most once; exactly once when the flow got logistics' answer.
    let exactly =
        f.status == "succeeded" || matches!(failure, Some(OrderFailure::Refused | OrderFailure::MailRefused));
    inv.check(if exactly { l.ships == 1 } else { l.ships <= 1 }, || {
        let want = if exactly { "exactly once" } else { "at most once" };
        format!("{flow} ({}): shipped {} times, expected {want}", f.status, l.ships)
    });
    // One transaction id (the journaled UUID) for every payment call.
    inv.check(l.transactions.len() <= 1, || {
        format!("{flow}: payment calls under {} transaction ids {:?}", l.transactions.len(), l.transactions)
    });

    let captured_once = || l.captured.len() == 1 && l.captured == l.reserved;
    let captured_message = |why: &str| {
        format!(
            "{flow} ({why}): payment captured for transactions {:?}, reserved {:?}; expected exactly one \
             capture of the reserved transaction",
            l.captured, l.reserved
        )
    };
    let never_captured =
        |why: &str| format!("{flow} ({why}): payment captured ({:?}) but it never should be", l.captured);
    match (f.status.as_str(), &failure) {
        ("succeeded", _) => {
            inv.check(captured_once(), || captured_message("succeeded"));
            inv.check(l.cancels == 0, || {
                format!("{flow} (succeeded): payment cancelled (refunded) {} time(s)", l.cancels)
            });
            inv.check(l.confirmations >= 1 || mail_set, || {
                format!("{flow} (succeeded): no {ORDER_CONFIRMATION}:{order_id} mail sent")
            });
        }
        (_, Some(OrderFailure::UnknownShipment)) => {
            inv.check(l.captured.is_empty(), || never_captured("shipment unknown"));
            inv.check(l.confirmations == 0, || {
                format!("{flow} (shipment unknown): {} confirmation mail(s) sent", l.confirmations)
            });
        }
        (_, Some(OrderFailure::Refused)) => {
            inv.check(l.captured.is_empty(), || never_captured("refused by logistics"));
            inv.check(l.cancels >= 1 && !l.reserved.is_empty(), || {
                format!("{flow} (refused by logistics): the reservation {:?} was never cancelled", l.reserved)
            });
        }
        (_, Some(OrderFailure::MailRefused)) => {
            inv.check(captured_once(), || captured_message("mail refused"))
        }
        _ => {}
    }
}

/// The `unknown_outcome_in_fault_window` check of an order failed `effect_outcome_unknown`.
/// An operator's restart, cancel or effect-set of the flow (`operated`: invoke and outcome times)
/// fences its activation just as a fault does, so its time counts as a window too.
fn check_unknown_in_window(
    f: &FinalFlow,
    entries: &[&LedgerEntry],
    windows: &[FaultRecord],
    operated: &[(u64, u64)],
    slack: u64,
    inv: &mut Invariant,
) {
    let ships: Vec<u64> =
        entries.iter().filter(|e| e.service == "logistics" && e.op == "ship").map(|e| e.ts_ms).collect();
    let (times, what) = if ships.is_empty() {
        (entries.iter().map(|e| e.ts_ms).max().into_iter().collect::<Vec<_>>(), "last ledger entry")
    } else {
        (ships, "ship")
    };
    if times.is_empty() {
        inv.check(false, || {
            format!("{}: failed {EFFECT_OUTCOME_UNKNOWN} with no ledger entry at all", f.flow)
        });
        return;
    }
    let covered = |t: u64| {
        windows.iter().any(|w| {
            w.start_ms.saturating_sub(slack) <= t && w.end_ms.is_none_or(|e| t <= e.saturating_add(slack))
        }) || operated
            .iter()
            .any(|&(from, to)| from.saturating_sub(slack) <= t && t <= to.saturating_add(slack))
    };
    let outside: Vec<u64> = times.iter().copied().filter(|&t| !covered(t)).collect();
    inv.check(outside.is_empty(), || {
        format!(
            "{}: failed {EFFECT_OUTCOME_UNKNOWN} but its {what} at {outside:?} ms is not within {slack} ms of any \
             of the {} fault(s)",
            f.flow,
            windows.len()
        )
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::history::FaultKind;

    const SHIP_UNKNOWN: &str = "effect \"ship\" was started but its outcome was not recorded";

    /// A synthetic run: what the four files would hold.
    #[derive(Clone)]
    struct Run {
        history: Vec<OpRecord>,
        faults: Vec<FaultRecord>,
        ledger: Vec<LedgerEntry>,
        finals: Vec<FinalFlow>,
    }

    impl Run {
        fn check(&self) -> CheckReport {
            check(&self.history, &self.faults, &self.ledger, &self.finals, &CheckOptions::default())
        }

        fn last(&mut self, flow: &str) -> &mut FinalFlow {
            self.finals.iter_mut().find(|f| f.flow == flow).unwrap()
        }

        /// Records `op` as an invoke and then `phase`, at `t`.
        fn op(&mut self, t: u64, op: Op, phase: Phase) {
            let id = self.history.len() as u64 / 2 + 1;
            let error = (phase != Phase::Ok).then(|| "deadline exceeded".to_owned());
            self.history.push(OpRecord {
                id,
                t_ms: t,
                process: 0,
                node: 1,
                phase: Phase::Invoke,
                op: op.clone(),
                error: None,
            });
            self.history.push(OpRecord { id, t_ms: t + 5, process: 0, node: 1, phase, op, error });
        }
    }

    fn order_input(instance: &str, products: &[&str]) -> String {
        serde_json::json!({
            "order_id": instance,
            "customer_id": "c-1",
            "total_cents": 1_000,
            "products": products,
        })
        .to_string()
    }

    /// The same JSON, formatted otherwise (as the API may give it back).
    fn reformatted(json: &str) -> String {
        serde_json::to_string_pretty(&serde_json::from_str::<Value>(json).unwrap()).unwrap()
    }

    fn start(flow_type: &str, instance: &str, input: &str) -> Op {
        Op::Start { flow_type: flow_type.into(), instance: instance.into(), input: input.into() }
    }

    fn send(instance: &str, key: &str) -> Op {
        Op::Send {
            flow_type: "signup".into(),
            instance: instance.into(),
            message_type: "EmailVerified".into(),
            key: key.into(),
            payload: serde_json::json!({ "key": key }).to_string(),
        }
    }

    fn message(key: &str) -> (String, String) {
        ("EmailVerified".into(), serde_json::json!({ "key": key }).to_string())
    }

    fn entry(service: &str, op: &str, instance: &str, key: &str, ts_ms: u64) -> LedgerEntry {
        LedgerEntry {
            service: service.into(),
            op: op.into(),
            flow: format!("order/{instance}"),
            key: key.into(),
            node: 1,
            ts_ms,
            epoch: Some(1),
        }
    }

    /// How far an order got, for [`order_ledger`].
    enum Outcome {
        /// reserve, ship, capture, confirmation mail.
        Shipped,
        /// reserve, ship (logistics said no), cancel.
        Refused,
        /// reserve, ship (then a crash before the outcome was recorded).
        Unknown,
    }

    /// The ledger entries order.rs makes for order `instance` (order id = instance) with
    /// transaction `tx`, from `t0` on, 100 ms apart.
    fn order_ledger(instance: &str, tx: &str, t0: u64, outcome: Outcome) -> Vec<LedgerEntry> {
        let mut out = vec![
            entry("payment", "reserve", instance, tx, t0),
            entry("logistics", "ship", instance, instance, t0 + 100),
        ];
        match outcome {
            Outcome::Shipped => {
                out.push(entry("payment", "capture", instance, tx, t0 + 200));
                out.push(entry(
                    "email",
                    "send",
                    instance,
                    &format!("order-confirmation:{instance}"),
                    t0 + 300,
                ));
            }
            Outcome::Refused => out.push(entry("payment", "cancel", instance, tx, t0 + 200)),
            Outcome::Unknown => {}
        }
        out
    }

    fn final_flow(flow: &str, status: &str, input: &str) -> FinalFlow {
        FinalFlow {
            flow: flow.into(),
            status: status.into(),
            error_kind: None,
            error: None,
            input: reformatted(input),
            messages: Vec::new(),
            output: None,
            fired: Vec::new(),
            child_results: Vec::new(),
        }
    }

    fn failed(flow: &str, input: &str, kind: &str, error: &str) -> FinalFlow {
        FinalFlow {
            error_kind: Some(kind.into()),
            error: Some(error.into()),
            ..final_flow(flow, "failed", input)
        }
    }

    /// A run that passes: a shipped order, a refused one, one whose shipment is unknown (during a
    /// kill), one whose start is unknown and that never happened, and a signup with messages.
    fn clean() -> Run {
        let mut run = Run { history: Vec::new(), faults: Vec::new(), ledger: Vec::new(), finals: Vec::new() };

        let o1 = order_input("o-1", &["p-1", "p-2"]);
        run.op(1_000, start("order", "o-1", &o1), Phase::Ok);
        run.ledger.extend(order_ledger("o-1", "tx-1", 1_100, Outcome::Shipped));
        run.finals.push(final_flow("order/o-1", "succeeded", &o1));

        let o2 = order_input("o-2", &["p-1", "fail-ship-7"]);
        run.op(2_000, start("order", "o-2", &o2), Phase::Ok);
        run.ledger.extend(order_ledger("o-2", "tx-2", 2_100, Outcome::Refused));
        run.finals.push(failed(
            "order/o-2",
            &o2,
            "error",
            "logistics rejected the call: cannot ship product fail-ship-7",
        ));

        // Acknowledged twice (a retried start), shipped during the kill of node 2.
        let o3 = order_input("o-3", &["p-1"]);
        run.op(9_500, start("order", "o-3", &o3), Phase::Ok);
        run.op(9_600, start("order", "o-3", &o3), Phase::Ok);
        run.ledger.extend(order_ledger("o-3", "tx-3", 9_900, Outcome::Unknown));
        run.finals.push(failed("order/o-3", &o3, EFFECT_OUTCOME_UNKNOWN, SHIP_UNKNOWN));
        run.faults.push(FaultRecord {
            id: 1,
            start_ms: 9_000,
            end_ms: None,
            kind: FaultKind::Kill { node: 2 },
        });
        run.faults.push(FaultRecord {
            id: 1,
            start_ms: 9_000,
            end_ms: Some(12_000),
            kind: FaultKind::Kill { node: 2 },
        });

        // Its outcome unknown, and it did not happen: no obligation.
        run.op(13_000, start("order", "o-4", &order_input("o-4", &["p-1"])), Phase::Info);

        let s1 = serde_json::json!({ "customer_id": "s-1", "email": "s-1@example.org" }).to_string();
        run.op(3_000, start("signup", "s-1", &s1), Phase::Ok);
        // Acknowledged, then delivered again (through another node): one message.
        run.op(3_100, send("s-1", "verify-s-1-0"), Phase::Ok);
        run.op(3_200, send("s-1", "verify-s-1-0"), Phase::Ok);
        // Its outcome unknown, and it did arrive.
        run.op(3_300, send("s-1", "verify-s-1-1"), Phase::Info);
        let mut s1_final = final_flow("signup/s-1", "succeeded", &s1);
        s1_final.messages = vec![message("verify-s-1-0"), message("verify-s-1-1")];
        run.finals.push(s1_final);
        run
    }

    /// Asserts that `report` has exactly one violation, in `name`, and that it mentions every
    /// one of `needles`.
    fn assert_only(report: &CheckReport, name: &str, needles: &[&str]) {
        assert!(!report.passed(), "{}", report.summary());
        for inv in &report.invariants {
            if inv.name == name {
                assert_eq!(inv.violations.len(), 1, "{}", report.summary());
                for needle in needles {
                    assert!(inv.violations[0].contains(needle), "{needle:?} not in {:?}", inv.violations[0]);
                }
            } else {
                assert!(inv.violations.is_empty(), "{}", report.summary());
            }
        }
        assert!(report.invariant(name).is_some(), "no invariant {name}");
    }

    #[test]
    fn clean_run_passes() {
        let report = clean().check();
        assert!(report.passed(), "{}", report.summary());
        assert_eq!(report.invariants.len(), 7);
        for inv in &report.invariants {
            assert!(inv.checked > 0, "{} checked nothing", inv.name);
            assert!(inv.violations.is_empty());
        }
        let required: Vec<&str> = report.invariants.iter().filter(|i| i.required).map(|i| i.name).collect();
        assert_eq!(required, ["acknowledged_starts_kept", "terminal_after_heal", "order_effects_once"]);
        // Four acknowledged starts of three orders and a signup; four flows in the end.
        assert_eq!(report.invariant("acknowledged_starts_kept").unwrap().checked, 4);
        assert_eq!(report.invariant("input_kept").unwrap().checked, 5);
        assert_eq!(report.invariant("terminal_after_heal").unwrap().checked, 4);
        assert_eq!(report.invariant("no_refund_of_unknown_shipment").unwrap().checked, 1);
        assert_eq!(report.invariant("unknown_outcome_in_fault_window").unwrap().checked, 1);
        // Two keys in the signup's messages, one acknowledged key.
        assert_eq!(report.invariant("messages_once_per_key").unwrap().checked, 3);
        assert_eq!(report.summary().lines().count(), 7);
    }

    #[test]
    fn a_run_with_no_operations_does_not_pass() {
        let report = check(&[], &[], &[], &[], &CheckOptions::default());
        assert!(!report.passed(), "{}", report.summary());
        assert!(report.invariants.iter().all(|i| i.checked == 0 && i.violations.is_empty()));
        assert!(report.summary().contains("nothing checked"), "{}", report.summary());
    }

    #[test]
    fn optional_invariants_may_check_nothing() {
        let mut run = clean();
        // Only the shipped order and no messages: the optional invariants about unknown
        // shipments and messages check nothing, and the run still passes.
        run.finals.retain(|f| f.flow == "order/o-1");
        run.history.retain(|r| r.op.flow() == "order/o-1");
        let report = run.check();
        assert!(report.passed(), "{}", report.summary());
        assert_eq!(report.invariant("unknown_outcome_in_fault_window").unwrap().checked, 0);
        assert_eq!(report.invariant("messages_once_per_key").unwrap().checked, 0);
    }

    #[test]
    fn an_acknowledged_start_missing_is_caught() {
        let mut run = clean();
        run.finals.retain(|f| f.flow != "order/o-1");
        assert_only(&run.check(), "acknowledged_starts_kept", &["order/o-1", "not in the final state"]);
    }

    #[test]
    fn a_changed_input_is_caught() {
        let mut run = clean();
        run.last("order/o-1").input = order_input("o-1", &["p-1", "p-3"]);
        assert_only(&run.check(), "input_kept", &["order/o-1", "p-2", "p-3"]);
    }

    #[test]
    fn a_flow_left_running_is_caught() {
        let mut run = clean();
        run.last("signup/s-1").status = "running".into();
        assert_only(&run.check(), "terminal_after_heal", &["signup/s-1", "running"]);
    }

    #[test]
    fn an_order_shipped_twice_is_caught() {
        let mut run = clean();
        run.ledger.push(entry("logistics", "ship", "o-1", "o-1", 5_000));
        assert_only(&run.check(), "order_effects_once", &["order/o-1", "shipped 2 times"]);
    }

    #[test]
    fn a_succeeded_order_never_captured_is_caught() {
        let mut run = clean();
        run.ledger.retain(|e| !(e.flow == "order/o-1" && e.op == "capture"));
        assert_only(&run.check(), "order_effects_once", &["order/o-1", "captured for transactions {}"]);
    }

    #[test]
    fn a_capture_retried_with_the_same_transaction_is_one_capture() {
        let mut run = clean();
        run.ledger.push(entry("payment", "capture", "o-1", "tx-1", 1_250));
        assert!(run.check().passed(), "{}", run.check().summary());
        // Under another transaction id it is a second payment.
        run.ledger.push(entry("payment", "capture", "o-1", "tx-9", 1_260));
        let report = run.check();
        let inv = report.invariant("order_effects_once").unwrap();
        assert!(inv.violations.iter().any(|v| v.contains("2 transaction ids")), "{}", report.summary());
    }

    #[test]
    fn a_failure_the_order_flow_cannot_produce_is_caught() {
        let mut run = clean();
        run.last("order/o-1").status = "failed".into();
        run.last("order/o-1").error_kind = Some("panic".into());
        run.last("order/o-1").error = Some("boom".into());
        let report = run.check();
        let inv = report.invariant("order_effects_once").unwrap();
        assert!(
            inv.violations.iter().any(|v| v.contains("order/o-1") && v.contains("\"panic\"")),
            "{}",
            report.summary()
        );

        // effect_outcome_unknown on a step other than ship.
        let mut run = clean();
        run.last("order/o-3").error =
            Some("effect \"capture\" was started but its outcome was not recorded".into());
        assert_only(&run.check(), "order_effects_once", &["order/o-3", "effect_outcome_unknown"]);

        // logistics' "no" for an order without a fail-ship product.
        let mut run = clean();
        let input = order_input("o-2", &["p-1"]);
        run.last("order/o-2").input = input.clone();
        for r in &mut run.history {
            if let Op::Start { instance, input: i, .. } = &mut r.op {
                if instance == "o-2" {
                    *i = input.clone();
                }
            }
        }
        assert_only(&run.check(), "order_effects_once", &["order/o-2", "logistics rejected"]);
    }

    #[test]
    fn a_refund_of_an_unknown_shipment_is_caught() {
        let mut run = clean();
        run.ledger.push(entry("payment", "cancel", "o-3", "tx-3", 10_500));
        assert_only(&run.check(), "no_refund_of_unknown_shipment", &["order/o-3", "refunded"]);
    }

    #[test]
    fn an_unknown_outcome_outside_every_fault_window_is_caught() {
        let mut run = clean();
        for e in &mut run.ledger {
            if e.flow == "order/o-3" {
                e.ts_ms += 90_000;
            }
        }
        assert_only(&run.check(), "unknown_outcome_in_fault_window", &["order/o-3", "[100000]"]);
        // An operator's restart of that order at the time explains it as a fault would; one of
        // another order does not.
        let mut other = run.clone();
        other.op(99_950, control("o-1", ControlAction::Restart), Phase::Ok);
        assert_only(&other.check(), "unknown_outcome_in_fault_window", &["order/o-3", "[100000]"]);
        run.op(99_950, control("o-3", ControlAction::Restart), Phase::Info);
        assert!(run.check().passed(), "{}", run.check().summary());

        // Within the slack after the end: fine; an unhealed fault lasts forever.
        let mut run = clean();
        run.ledger.iter_mut().filter(|e| e.flow == "order/o-3").for_each(|e| e.ts_ms = 16_900);
        assert!(run.check().passed(), "{}", run.check().summary());
        run.ledger.iter_mut().filter(|e| e.flow == "order/o-3").for_each(|e| e.ts_ms = 100_000);
        run.faults.retain(|f| f.end_ms.is_none());
        assert!(run.check().passed(), "{}", run.check().summary());
    }

    #[test]
    fn an_unknown_outcome_without_a_ship_entry_uses_the_last_entry() {
        let mut run = clean();
        run.ledger.retain(|e| !(e.flow == "order/o-3" && e.op == "ship"));
        assert!(run.check().passed(), "{}", run.check().summary());
        run.ledger.iter_mut().filter(|e| e.flow == "order/o-3").for_each(|e| e.ts_ms = 50_000);
        assert_only(&run.check(), "unknown_outcome_in_fault_window", &["order/o-3", "last ledger entry"]);
    }

    #[test]
    fn a_message_key_twice_is_caught() {
        let mut run = clean();
        run.last("signup/s-1").messages.push(message("verify-s-1-1"));
        assert_only(&run.check(), "messages_once_per_key", &["signup/s-1", "verify-s-1-1", "2 times"]);
    }

    #[test]
    fn an_acknowledged_send_missing_is_caught() {
        let mut run = clean();
        run.last("signup/s-1").messages.retain(|(_, p)| !p.contains("verify-s-1-0"));
        assert_only(&run.check(), "messages_once_per_key", &["signup/s-1", "verify-s-1-0", "0 time(s)"]);
    }

    #[test]
    fn check_dir_reads_a_run_directory() {
        let run = clean();
        let dir = std::env::temp_dir().join(format!("fetter-chaos-checker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        fn write<T: serde::Serialize>(path: &std::path::Path, records: &[T]) {
            let text: String = records.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
            std::fs::write(path, text).unwrap();
        }
        write(&dir.join(history::HISTORY), &run.history);
        write(&dir.join(history::FAULTS), &run.faults);
        write(&dir.join(history::LEDGER), &run.ledger);
        write(&dir.join(history::FINAL), &run.finals);
        let digests: Vec<DigestRecord> = (1..=3).map(|n| digest(0, n, 7, "aa")).collect();
        write(&dir.join(history::DIGESTS), &digests);
        let placement = vec![placed(0, Some(1), &[1, 2, 3], &[1, 2, 3])];
        write(&dir.join(history::PLACEMENT), &placement);
        let (h, f, l, fin) = load(&dir).unwrap();
        assert_eq!((h.len(), f.len(), l.len(), fin.len()), (run.history.len(), 2, run.ledger.len(), 4));
        let report = check_dir(&dir, &CheckOptions::default()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(report.passed(), "{}", report.summary());
        let mut expected = run.check();
        expected.invariants.push(check_timers_not_early(&run.ledger, &run.finals));
        expected.invariants.push(check_timers_not_late(&run.ledger, &run.finals, &run.faults, 5_000));
        expected.invariants.push(check_loans(&run.finals));
        expected.invariants.push(check_batches(&run.finals));
        expected.invariants.push(check_newsletters(&run.ledger, &run.finals));
        expected.invariants.push(check_messaging_orders(&run.ledger, &run.finals));
        expected.invariants.push(check_sends(&run.finals));
        expected.invariants.push(check_single_activation(&run.ledger));
        expected.invariants.push(check_control_ops(&run.history, &run.ledger, &run.finals));
        expected.invariants.push(check_replicas(&digests));
        expected.invariants.push(check_placement(&placement));
        assert_eq!(report, expected);
    }

    fn placed(shard: u32, leader: Option<u64>, replicas: &[u64], members: &[u64]) -> PlacementRecord {
        PlacementRecord { shard, leader, replicas: replicas.to_vec(), members: members.to_vec() }
    }

    #[test]
    fn a_shard_with_too_few_replicas_or_one_on_a_lost_node_is_reported() {
        let members = [1, 2, 5];
        let good: Vec<PlacementRecord> = (0..3).map(|k| placed(k, Some(1), &[1, 2, 5], &members)).collect();
        let inv = check_placement(&good);
        assert!(inv.passed() && inv.checked == 3, "{inv:?}");
        // Chaos seed 245960196731812 before the fix: two replicas although three members live.
        let mut short = good.clone();
        short[1].replicas = vec![1, 5];
        let inv = check_placement(&short);
        assert!(inv.violations.len() == 1 && inv.violations[0].contains("shard 1"), "{inv:?}");
        let mut stale = good.clone();
        stale[2].replicas = vec![1, 2, 4];
        assert!(!check_placement(&stale).passed(), "a replica on the lost node 4");
        let mut leaderless = good;
        leaderless[0].leader = None;
        assert!(!check_placement(&leaderless).passed());
        assert!(check_placement(&[placed(0, Some(1), &[1], &[1])]).passed(), "one node: one replica");
        assert!(!check_placement(&[]).passed(), "nothing recorded: nothing checked, and it is required");
    }

    fn digest(shard: u32, node: u64, index: u64, digest: &str) -> DigestRecord {
        DigestRecord { shard, node, applied_index: index, stable: true, rows: 10, digest: digest.into() }
    }

    #[test]
    fn replicas_that_agree_pass_and_a_divergent_or_unsettled_replica_is_reported() {
        let good: Vec<DigestRecord> =
            (0..2).flat_map(|s| (1..=3).map(move |n| digest(s, n, 40 + u64::from(s), "aa"))).collect();
        let inv = check_replicas(&good);
        assert!(inv.passed() && inv.checked == 4, "{inv:?}");

        let mut diverged = good.clone();
        diverged[4].digest = "bb".into();
        let inv = check_replicas(&diverged);
        assert_eq!(inv.violations.len(), 1, "{inv:?}");
        assert!(inv.violations[0].contains("shard 1") && inv.violations[0].contains("differ"), "{inv:?}");

        let mut behind = good.clone();
        behind[0].applied_index = 39;
        let inv = check_replicas(&behind);
        assert!(inv.violations.len() == 1 && inv.violations[0].contains("never settled"), "{inv:?}");

        let mut moving = good;
        moving[2].stable = false;
        assert!(!check_replicas(&moving).passed());

        assert!(!check_replicas(&[]).passed(), "no digests: nothing checked, and it is required");
    }

    fn mail(flow: &str, template: &str, customer: &str, ts_ms: u64) -> LedgerEntry {
        LedgerEntry {
            service: Email::SERVICE.into(),
            op: Email::SEND.into(),
            flow: flow.into(),
            key: Email::key_of(template, customer),
            node: 1,
            ts_ms,
            epoch: None,
        }
    }

    fn signup(instance: &str, interval: u64) -> FinalFlow {
        FinalFlow {
            flow: format!("signup/{instance}"),
            status: "failed".into(),
            error_kind: Some("not_verified".into()),
            error: None,
            input:
                serde_json::json!({"customer_id": instance, "email": "x@y", "reminder_interval_ms": interval})
                    .to_string(),
            messages: Vec::new(),
            output: None,
            fired: Vec::new(),
            child_results: Vec::new(),
        }
    }

    #[test]
    fn a_reminder_before_its_interval_is_an_early_timer() {
        let finals = vec![signup("s-1", 2_000), signup("s-2", 2_000)];
        let mut ledger = vec![
            mail("signup/s-1", Email::ACTIVATION, "s-1", 1_000),
            // A repeated activation mail (a replay) does not move the first one.
            mail("signup/s-1", Email::ACTIVATION, "s-1", 1_500),
            mail("signup/s-1", Email::REMINDER, "s-1", 3_000),
            mail("signup/s-2", Email::ACTIVATION, "s-2", 1_000),
            mail("signup/s-2", Email::REMINDER, "s-2", 3_100),
        ];
        let inv = check_timers_not_early(&ledger, &finals);
        assert!(inv.passed() && inv.checked == 2, "{inv:?}");
        ledger.push(mail("signup/s-2", Email::REMINDER, "s-2", 2_500));
        let inv = check_timers_not_early(&ledger, &finals);
        assert_eq!(inv.violations.len(), 1, "{inv:?}");
        assert!(inv.violations[0].contains("signup/s-2") && inv.violations[0].contains("1500 ms"), "{inv:?}");
    }

    fn loan(
        instance: &str,
        replies: &[(&str, bool)],
        fired_after: Option<usize>,
        output: (bool, u64),
    ) -> FinalFlow {
        FinalFlow {
            flow: format!("loan/{instance}"),
            status: "succeeded".into(),
            error_kind: None,
            error: None,
            input: "{}".into(),
            messages: replies
                .iter()
                .map(|(bureau, approved)| {
                    let payload = serde_json::json!({"bureau": bureau, "approved": approved, "key": format!("{bureau}:{instance}")});
                    ("CreditCheckOutcome".to_string(), payload.to_string())
                })
                .collect(),
            output: Some(serde_json::json!({"approved": output.0, "replies": output.1, "reason": null}).to_string()),
            fired: fired_after.map(|n| vec![("replies".to_string(), n)]).unwrap_or_default(),
            child_results: Vec::new(),
        }
    }

    #[test]
    fn a_loan_decided_on_other_replies_than_its_log_holds_is_caught() {
        let good = vec![
            // Three replies: decided without the window.
            loan("l-1", &[("bureau-a", true), ("bureau-b", true), ("bureau-c", true)], None, (true, 3)),
            // The window closed after two; a third came later and does not count.
            loan("l-2", &[("bureau-b", true), ("bureau-a", true), ("bureau-c", false)], Some(2), (true, 2)),
            // One reply in time: rejected on too few.
            loan("l-3", &[("bureau-c", true)], Some(1), (false, 1)),
            // A rejection counts; a repeated bureau counts once.
            loan("l-4", &[("bureau-a", false), ("bureau-a", true), ("bureau-b", true)], None, (false, 2)),
        ];
        let inv = check_loans(&good);
        assert!(inv.passed() && inv.checked == 4, "{inv:?}");
        // The late rejection counted: a decision its log does not imply.
        let late = vec![loan(
            "l-2",
            &[("bureau-b", true), ("bureau-a", true), ("bureau-c", false)],
            Some(2),
            (false, 3),
        )];
        let inv = check_loans(&late);
        assert!(inv.violations.len() == 1 && inv.violations[0].contains("loan/l-2"), "{inv:?}");
        // Finished on two replies with no window closed.
        let early = vec![loan("l-5", &[("bureau-a", true), ("bureau-b", true)], None, (true, 2))];
        assert!(check_loans(&early).violations[0].contains("without its window closing"));
        let mut failed = loan("l-6", &[], Some(0), (false, 0));
        failed.status = "failed".into();
        assert!(!check_loans(&[failed]).passed(), "a loan always succeeds");
    }

    /// A batch of orders o-a (succeeded) and o-b (failed), with their children.
    fn batch() -> Vec<FinalFlow> {
        let order = |id: &str| serde_json::json!({"order_id": id, "customer_id": "c", "total_cents": 1, "products": ["p-1"]});
        let input = serde_json::json!({"batch_id": "b-1", "orders": [order("o-a"), order("o-b")]});
        let output = serde_json::json!({
            "batch_id": "b-1",
            "succeeded": ["o-a"],
            "failed": [{"order_id": "o-b", "kind": "effect_outcome_unknown", "message": "ship"}],
        });
        let mut b = final_flow("bulk-orders/b-1", "succeeded", &input.to_string());
        b.output = Some(output.to_string());
        b.child_results = vec!["order/o-b".into(), "order/o-a".into()];
        vec![
            b,
            final_flow("order/o-a", "succeeded", &order("o-a").to_string()),
            failed("order/o-b", &order("o-b").to_string(), "effect_outcome_unknown", "ship"),
        ]
    }

    #[test]
    fn a_batch_whose_child_result_came_twice_or_was_listed_wrong_is_caught() {
        let inv = check_batches(&batch());
        assert!(inv.passed() && inv.checked == 3, "{inv:?}");
        let mut twice = batch();
        twice[0].child_results.push("order/o-a".into());
        let inv = check_batches(&twice);
        assert!(
            inv.violations.len() == 1 && inv.violations[0].contains("order o-a: 2 child result(s)"),
            "{inv:?}"
        );
        let mut wrong = batch();
        wrong[1].status = "failed".into();
        assert!(!check_batches(&wrong).passed(), "listed succeeded, but the child failed");
        let mut lost = batch();
        lost.remove(2);
        assert!(check_batches(&lost).violations[0].contains("no child flow order/o-b"));
        let mut unlisted = batch();
        unlisted[0].output = Some(serde_json::json!({"succeeded": ["o-a"], "failed": []}).to_string());
        assert_eq!(check_batches(&unlisted).violations.len(), 2, "o-b listed 0 times, 1 of 2 listed");
    }

    #[test]
    fn a_newsletter_recipient_never_mailed_or_counted_twice_is_caught() {
        let input = serde_json::json!({"issue": "n-1", "recipients": ["a@x", "b@x"]}).to_string();
        let mut done = final_flow("newsletter/n-1", "succeeded", &input);
        done.output = Some("2".into());
        let newsletter = |to: &str, ts_ms: u64| LedgerEntry {
            service: Email::SERVICE.into(),
            op: Email::SEND.into(),
            flow: "newsletter/n-1".into(),
            key: Email::key_of(Email::NEWSLETTER, to),
            node: 1,
            ts_ms,
            epoch: None,
        };
        // b@x mailed twice (a replay after a crash between the mail and its checkpoint): fine.
        let ledger = vec![newsletter("a@x", 1), newsletter("b@x", 2), newsletter("b@x", 3)];
        let inv = check_newsletters(&ledger, std::slice::from_ref(&done));
        assert!(inv.passed() && inv.checked == 1, "{inv:?}");
        let inv = check_newsletters(&ledger[..1], std::slice::from_ref(&done));
        assert!(inv.violations.len() == 1 && inv.violations[0].contains("newsletter:b@x"), "{inv:?}");
        let mut counted_twice = done.clone();
        counted_twice.output = Some("3".into());
        assert!(!check_newsletters(&ledger, &[counted_twice]).passed());
        let mut stranger = ledger.clone();
        stranger.push(newsletter("c@x", 4));
        assert!(check_newsletters(&stranger, &[done]).violations[0].contains("outside the list"));
    }

    #[test]
    fn a_messaging_order_that_did_not_end_as_answered_is_caught() {
        let input = order_input("om-1", &["p-1"]);
        let entry = |service: &str, op: &str, key: &str| LedgerEntry {
            service: service.into(),
            op: op.into(),
            flow: "order-messaging/om-1".into(),
            key: key.into(),
            node: 1,
            ts_ms: 1,
            epoch: None,
        };
        let shipped = vec![
            entry("payment", "reserve", "tx"),
            entry("logistics", "ship", "om-1"),
            entry("payment", "capture", "tx"),
            entry("email", "send", &format!("{ORDER_CONFIRMATION}:om-1")),
        ];
        let mut done = final_flow("order-messaging/om-1", "succeeded", &input);
        done.messages = vec![
            ("FundsReserved".into(), "{}".into()),
            ("ProductsShipped".into(), r#"{"tracking_id":"tt-om-1"}"#.into()),
        ];
        done.output = Some(r#"{"tracking_id":"tt-om-1"}"#.into());
        let inv = check_messaging_orders(&shipped, std::slice::from_ref(&done));
        assert!(inv.passed() && inv.checked == 1, "{inv:?}");
        // Shipped twice.
        let mut twice = shipped.clone();
        twice.push(entry("logistics", "ship", "om-1"));
        assert!(!check_messaging_orders(&twice, std::slice::from_ref(&done)).passed());
        // Another tracking id than logistics sent.
        let mut other = done.clone();
        other.output = Some(r#"{"tracking_id":"tt-else"}"#.into());
        assert!(!check_messaging_orders(&shipped, &[other]).passed());
        // Failed as "shipment failed" although the log holds the shipment.
        let refunded = vec![
            entry("payment", "reserve", "tx"),
            entry("logistics", "ship", "om-1"),
            entry("payment", "cancel", "tx"),
        ];
        let mut wrong = failed("order-messaging/om-1", &input, "shipment_failed", "out of stock");
        wrong.messages = done.messages.clone();
        assert!(!check_messaging_orders(&refunded, std::slice::from_ref(&wrong)).passed());
        wrong.messages = vec![("ShipmentFailed".into(), r#"{"reason":"out of stock"}"#.into())];
        assert!(check_messaging_orders(&refunded, &[wrong]).passed());
    }

    fn fault(id: u64, start_ms: u64, end_ms: u64) -> FaultRecord {
        FaultRecord { id, start_ms, end_ms: Some(end_ms), kind: FaultKind::Kill { node: 1 } }
    }

    #[test]
    fn a_reminder_late_beyond_what_faults_explain_is_a_late_timer() {
        let finals = vec![signup("s-1", 2_000), signup("s-2", 2_000)];
        let ledger = vec![
            mail("signup/s-1", Email::ACTIVATION, "s-1", 1_000),
            mail("signup/s-1", Email::REMINDER, "s-1", 4_000),
            mail("signup/s-2", Email::ACTIVATION, "s-2", 1_000),
            // A replay's mail: the timer's deadline is counted from the last call.
            mail("signup/s-2", Email::ACTIVATION, "s-2", 2_000),
            mail("signup/s-2", Email::REMINDER, "s-2", 20_000),
        ];
        // s-2 is 16 s late; a 12 s fault (two overlapping records) in between explains 12 s.
        let faults = vec![fault(1, 5_000, 12_000), fault(2, 10_000, 17_000)];
        let inv = check_timers_not_late(&ledger, &finals, &faults, 5_000);
        assert!(inv.passed() && inv.checked == 2, "{inv:?}");
        let inv = check_timers_not_late(&ledger, &finals, &faults[..1], 5_000);
        assert_eq!(inv.violations.len(), 1, "{inv:?}");
        assert!(
            inv.violations[0].contains("signup/s-2") && inv.violations[0].contains("16000 ms after"),
            "{inv:?}"
        );
        assert!(inv.violations[0].contains("7000 ms of it under faults"), "{inv:?}");
    }

    fn call(epoch: u64, node: u64, ts_ms: u64) -> LedgerEntry {
        LedgerEntry { epoch: Some(epoch), node, ..entry("payment", "reserve", "o-1", "tx-1", ts_ms) }
    }

    #[test]
    fn an_older_activation_that_goes_on_calling_after_a_newer_one_started_is_caught() {
        // Epoch 3 on node 1 is superseded by epoch 4 on node 2 (first call at 1_000); one call of
        // its effect in flight after that is allowed.
        let fine = vec![call(3, 1, 500), call(4, 2, 1_000), call(3, 1, 1_020), call(4, 2, 1_100)];
        let inv = check_single_activation(&fine);
        assert!(inv.passed() && inv.checked == 2, "{inv:?}");

        let mut going_on = fine.clone();
        going_on.push(call(3, 1, 1_200));
        let inv = check_single_activation(&going_on);
        assert_eq!(inv.violations.len(), 1, "{inv:?}");
        assert!(inv.violations[0].contains("order/o-1: epoch 3 (node {1}) made 2 calls"), "{inv:?}");

        let two_nodes = vec![call(5, 1, 500), call(5, 2, 600)];
        let inv = check_single_activation(&two_nodes);
        assert!(inv.violations[0].contains("epoch 5 made calls from nodes {1, 2}"), "{inv:?}");

        // A ledger without epochs checks nothing: the invariant is required, so that fails.
        let inv = check_single_activation(&[LedgerEntry {
            epoch: None,
            ..entry("payment", "reserve", "o-1", "tx-1", 1)
        }]);
        assert!(!inv.passed() && inv.checked == 0, "{inv:?}");
    }

    fn control(instance: &str, action: ControlAction) -> Op {
        Op::Control { flow_type: "order".into(), instance: instance.into(), action, expected_epoch: Some(2) }
    }

    #[test]
    fn an_acknowledged_cancel_or_effect_set_that_did_not_hold_is_caught() {
        let mut run = clean();
        let o9 = order_input("o-9", &["p-1"]);
        run.op(20_000, start("order", "o-9", &o9), Phase::Ok);
        run.ledger.push(entry("payment", "reserve", "o-9", "tx-9", 20_050));
        // Cancel acknowledged at 20_105; the ship call in flight (20_110) is allowed.
        run.op(20_100, control("o-9", ControlAction::Cancel), Phase::Ok);
        run.ledger.push(entry("logistics", "ship", "o-9", "o-9", 20_110));
        run.finals.push(final_flow("order/o-9", "cancelled", &o9));
        let mail = ControlAction::SetEffect { effect_id: "email".into(), value: "null".into() };
        run.op(1_350, control("o-1", mail), Phase::Ok);
        let inv = check_control_ops(&run.history, &run.ledger, &run.finals);
        assert!(inv.passed() && inv.checked == 2, "{inv:?}");
        // o-1's mail set done after it was sent: the order need not mail again.
        run.ledger.retain(|e| !(e.flow == "order/o-1" && e.service == "email"));
        assert!(run.check().passed(), "{}", run.check().summary());

        let mut bad = run.clone();
        bad.ledger.push(entry("payment", "capture", "o-9", "tx-9", 20_300));
        bad.last("order/o-9").status = "succeeded".into();
        let inv = check_control_ops(&bad.history, &bad.ledger, &bad.finals);
        assert_eq!(inv.violations.len(), 1, "{inv:?}");
        assert!(inv.violations[0].contains("ended Some(\"succeeded\") with 2 call(s) after it"), "{inv:?}");

        bad = run.clone();
        for t in [1_400, 1_500] {
            bad.ledger.push(entry("email", "send", "o-1", "order-confirmation:o-1", t));
        }
        let inv = check_control_ops(&bad.history, &bad.ledger, &bad.finals);
        assert!(inv.violations[0].contains("order/o-1: its mail was set done"), "{inv:?}");
    }

    fn referred(from: &str, points: u64) -> (String, String) {
        ("Referred".into(), serde_json::json!({ "from": from, "points": points, "key": from }).to_string())
    }

    #[test]
    fn a_send_between_flows_lost_doubled_or_miscounted_is_caught() {
        let referral = |i: u64, account: &str| {
            let input = serde_json::json!({ "rewards": account, "points": 10 * i }).to_string();
            final_flow(&format!("referral/r-{i}"), "succeeded", &input)
        };
        let mut account = final_flow("rewards/w-1", "succeeded", r#"{"referrals":2}"#);
        account.messages = vec![referred("referral/r-2", 20), referred("referral/r-1", 10)];
        account.output = Some(r#"{"points":30,"from":["referral/r-2","referral/r-1"]}"#.into());
        let finals = vec![referral(1, "w-1"), referral(2, "w-1"), account];
        let inv = check_sends(&finals);
        assert!(inv.passed() && inv.checked == 3, "{inv:?}");

        let mut lost = finals.clone();
        lost[2].messages.remove(1);
        let inv = check_sends(&lost);
        assert!(
            inv.violations
                .iter()
                .any(|v| v.contains("referral/r-1: its message is in rewards/w-1's log 0 times")),
            "{inv:?}"
        );

        let mut doubled = finals.clone();
        doubled[2].messages.push(referred("referral/r-1", 10));
        let inv = check_sends(&doubled);
        assert!(inv.violations.iter().any(|v| v.contains("log 2 times")), "{inv:?}");

        let mut stranger = finals.clone();
        stranger[2].messages.push(referred("referral/r-9", 90));
        let inv = check_sends(&stranger);
        assert!(inv.violations.iter().any(|v| v.contains("a message from referral/r-9")), "{inv:?}");

        let mut miscounted = finals;
        miscounted[2].output = Some(r#"{"points":40,"from":["referral/r-2","referral/r-1"]}"#.into());
        let inv = check_sends(&miscounted);
        assert_eq!(inv.violations.len(), 1, "{inv:?}");
        assert!(inv.violations[0].contains("with 30 points"), "{inv:?}");
    }
}
