//! Flows talking to flows: customers referred to a rewards account.
//!
//! A `rewards` flow is a customer's account for one campaign: it waits for the number of
//! [`Referred`] messages its input names and adds up their points. Each `referral` flow sends one
//! [`Referred`] message to the account it names, with [`Ctx::send`] (effect `refer`): the send is
//! recorded in the same transaction as its outbox entry and delivered exactly once, on whichever
//! shard (and node) the account lives.
//!
//! The account must exist before a referral's message reaches it: a message to a flow that does
//! not exist (or has finished) is kept as a dead letter on the target's shard, not taken.
//!
//! ## The contract
//!
//! - `rewards` input `{"referrals": 3}`; output [`RewardsTotal`]: the points added up and the
//!   referral flows they came from, in the order the messages arrived.
//! - `referral` input `{"rewards": "<rewards instance>", "points": 10}`; output the points sent.
//! - The message: type `Referred`, payload `{"from": "referral/<instance>", "points": 10, "key":
//!   "referral/<instance>"}` (the key: the sender, so a message is told apart from a repeat).

use fetter::prelude::*;
use serde::{Deserialize, Serialize};

/// One referral's points, sent by the `referral` flow `from` to a rewards account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Referred {
    /// The sending flow, `referral/<instance>`.
    pub from: String,
    /// The points it earns.
    pub points: u64,
    /// The sender again: what makes this message unique.
    pub key: String,
}

impl Message for Referred {
    const NAME: &'static str = "Referred";
}

/// The input of `rewards`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewardsAccount {
    /// How many referrals to wait for.
    pub referrals: u32,
}

/// The output of `rewards`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewardsTotal {
    /// The sum of the points of the referrals taken.
    pub points: u64,
    /// The referral flows taken, in the order their messages arrived.
    pub from: Vec<String>,
}

/// The input of `referral`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Referral {
    /// The instance of the `rewards` flow to credit.
    pub rewards: String,
    /// The points this referral earns.
    pub points: u64,
}

/// The `rewards` flow: waits for its referrals and adds up their points.
pub struct RewardsFlow;

impl Flow for RewardsFlow {
    const TYPE: &'static str = "rewards";
    type Input = RewardsAccount;
    type Output = RewardsTotal;

    async fn run(&self, ctx: &Ctx, account: RewardsAccount) -> Result<RewardsTotal, FlowError> {
        let mut total = RewardsTotal { points: 0, from: Vec::new() };
        for _ in 0..account.referrals {
            let referred = ctx.message::<Referred>().await?;
            total.points += referred.points;
            total.from.push(referred.from);
        }
        Ok(total)
    }
}

/// The `referral` flow: credits its points to a rewards account, by a message.
pub struct ReferralFlow;

impl Flow for ReferralFlow {
    const TYPE: &'static str = "referral";
    type Input = Referral;
    type Output = u64;

    async fn run(&self, ctx: &Ctx, referral: Referral) -> Result<u64, FlowError> {
        let from = ctx.flow().to_string();
        let message = Referred { from: from.clone(), points: referral.points, key: from };
        ctx.send("refer", &FlowId::new(RewardsFlow::TYPE, referral.rewards), &message).await?;
        Ok(referral.points)
    }
}
