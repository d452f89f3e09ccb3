//! The loan application: ask three credit bureaus, decide on the replies that arrive within a
//! window.
//!
//! The flow requests a credit check from each bureau (`request-bureau-a`, `request-bureau-b`,
//! `request-bureau-c`, one effect each), then collects up to three [`CreditCheckOutcome`]
//! messages until the reply window closes (the durable timer `replies`; all three replies end
//! the wait early). The window is part of the journal: what counts is which replies are in the
//! flow's event log before the timer's firing, so a reply committed after the window closed is
//! never counted, on a replay or a restart either.
//!
//! The decision ([`LoanDecision`], the output; the flow succeeds either way): rejected when fewer
//! than [`MIN_REPLIES`] bureaus replied in time or any of them rejected, approved otherwise. A
//! bureau that replies twice counts once (its first reply; the second still takes one of the
//! wait's three places, so send replies with an idempotency key); a reply from a bureau that was
//! not asked is ignored the same way.
//!
//! Bureaus reply through the control panel's `send_message(flow, "CreditCheckOutcome",
//! payload, key)` to `loan/<application id>`, with the payload `{"bureau":"bureau-a",
//! "approved":true}`.

use std::time::Duration;

use fetter::prelude::*;
use serde::{Deserialize, Serialize};

use crate::fakes::CreditBureau;
use crate::ledger::Ledger;

/// The input of `loan`: a public contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoanApplication {
    /// The application's id; the instance of the flow, and in the ledger key
    /// `<bureau>:<application id>` of its credit checks.
    pub application_id: String,
    /// Who borrows.
    pub customer_id: String,
    /// How much.
    pub amount_cents: u64,
    /// How long the bureaus have to reply, in milliseconds (default:
    /// [`DEFAULT_REPLY_WINDOW`], 15 minutes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_window_ms: Option<u64>,
}

/// A credit bureau's verdict: a message to the flow, a public contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditCheckOutcome {
    /// Which bureau, e.g. `"bureau-a"`.
    pub bureau: String,
    /// Whether it approves the loan.
    pub approved: bool,
}

impl Message for CreditCheckOutcome {
    const NAME: &'static str = "CreditCheckOutcome";
}

/// The output of `loan`: the decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoanDecision {
    /// Whether the loan is granted.
    pub approved: bool,
    /// How many of the bureaus asked replied within the window.
    pub replies: usize,
    /// Why not, when rejected.
    pub reason: Option<String>,
}

/// The bureaus a loan application asks.
pub const BUREAUS: [&str; 3] = ["bureau-a", "bureau-b", "bureau-c"];
/// Replies needed within the window for a decision other than "rejected".
pub const MIN_REPLIES: usize = 2;
/// The reply window when the input names none: 15 minutes.
pub const DEFAULT_REPLY_WINDOW: Duration = Duration::from_secs(15 * 60);

/// The `loan` flow and the bureaus it asks.
pub struct LoanFlow {
    bureaus: Vec<CreditBureau>,
}

impl LoanFlow {
    /// A loan flow asking `bureaus`.
    pub fn new(bureaus: Vec<CreditBureau>) -> Self {
        LoanFlow { bureaus }
    }

    /// A loan flow asking the three [`BUREAUS`], recording to `ledger` (if any) as node `node`.
    pub fn with_standard_bureaus(ledger: Option<Ledger>, node: u64) -> Self {
        LoanFlow::new(BUREAUS.iter().map(|name| CreditBureau::new(*name, ledger.clone(), node)).collect())
    }

    /// The decision on `replies` (in log order).
    fn decide(&self, replies: &[CreditCheckOutcome]) -> LoanDecision {
        let mut counted: Vec<&CreditCheckOutcome> = Vec::new();
        for reply in replies {
            let asked = self.bureaus.iter().any(|b| b.name() == reply.bureau);
            if asked && !counted.iter().any(|c| c.bureau == reply.bureau) {
                counted.push(reply);
            }
        }
        let replies = counted.len();
        let reason = if let Some(no) = counted.iter().find(|r| !r.approved) {
            Some(format!("rejected by {}", no.bureau))
        } else if replies < MIN_REPLIES {
            Some(format!("only {replies} of {} bureaus replied in time", self.bureaus.len()))
        } else {
            None
        };
        LoanDecision { approved: reason.is_none(), replies, reason }
    }
}

impl Flow for LoanFlow {
    const TYPE: &'static str = "loan";
    type Input = LoanApplication;
    type Output = LoanDecision;

    async fn run(&self, ctx: &Ctx, application: LoanApplication) -> Result<LoanDecision, FlowError> {
        let flow = ctx.flow().to_string();
        let window = application.reply_window_ms.map_or(DEFAULT_REPLY_WINDOW, Duration::from_millis);
        for bureau in &self.bureaus {
            ctx.effect(format!("request-{}", bureau.name()), || async {
                bureau.request_check(
                    &flow,
                    &application.application_id,
                    &application.customer_id,
                    application.amount_cents,
                )
            })
            .await?;
        }
        let replies = ctx.messages::<CreditCheckOutcome>(self.bureaus.len(), "replies", window).await?;
        Ok(self.decide(&replies))
    }
}
