//! The newsletter: one mail per recipient, in constant space.
//!
//! A step per recipient — an effect `send-<i>` each — would make the flow's journal grow with
//! the list: ten thousand recipients, ten thousand recorded effects, all read again by every
//! replay. Instead the flow keeps one state value, `position` ([`Progress`]: the next recipient
//! and how many mails went out), overwritten in place. Whatever the number of recipients, the
//! journal holds that one value and no events (the input, the caller's list, is stored as given).
//!
//! ## The guarantee: at least once per recipient
//!
//! The mails are sent by the flow's code between two commits of `position` — a checkpoint after
//! every [`NewsletterFlow::checkpoint_every`] mails (1 by default: after each mail) and after the
//! last one. A replay reads the last committed position and continues from there, so no
//! recipient before it is mailed again and every recipient from it on is mailed. A crash (or a
//! fenced activation) between a mail and the next checkpoint mails the recipients since the last
//! checkpoint again on replay: **at least once** per recipient, and an interruption repeats at
//! most `checkpoint_every` mails. Exactly once would need a record per recipient, which is what
//! constant space gives up; checkpointing less often trades repeats for fewer journal commits
//! (each one a durable write: about 4 ms where the tests run, so 40 s for 10,000 single
//! checkpoints).
//!
//! A recipient the email service refuses (an empty address) is skipped and not counted. A mail
//! that could not be handed over at all fails the flow after a checkpoint at that recipient, so an
//! operator's restart (keeping the journal) continues there. The output is the number of mails
//! sent.

use fetter::prelude::*;
use serde::{Deserialize, Serialize};

use crate::fakes::{Email, ServiceError};

/// The input of `newsletter`: a public contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewsletterIssue {
    /// Which issue, e.g. `"2024-06"`.
    pub issue: String,
    /// The addresses to mail, in order; each is also the subject of its mail (ledger key
    /// `newsletter:<address>`).
    pub recipients: Vec<String>,
}

/// How far a newsletter got: the state `position`, overwritten at every checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The next recipient to mail (an index into [`NewsletterIssue::recipients`]).
    pub next: u64,
    /// Mails sent so far.
    pub sent: u64,
}

/// The id of the newsletter's one state value.
pub const POSITION: &str = "position";

/// The `newsletter` flow and the email service it sends with.
pub struct NewsletterFlow {
    email: Email,
    checkpoint_every: u64,
}

impl NewsletterFlow {
    /// A newsletter sender over `email`, checkpointing after every mail.
    pub fn new(email: Email) -> Self {
        NewsletterFlow { email, checkpoint_every: 1 }
    }

    /// Checkpoints the position after every `mails` mails (at least 1) instead: an interruption
    /// may then repeat up to `mails` mails (see the module docs).
    pub fn checkpoint_every(mut self, mails: u64) -> Self {
        self.checkpoint_every = mails.max(1);
        self
    }
}

impl Flow for NewsletterFlow {
    const TYPE: &'static str = "newsletter";
    type Input = NewsletterIssue;
    /// The number of mails sent.
    type Output = u64;

    async fn run(&self, ctx: &Ctx, issue: NewsletterIssue) -> Result<u64, FlowError> {
        let flow = ctx.flow().to_string();
        let position = ctx.state::<Progress>(POSITION);
        let mut progress = position.get().await?.unwrap_or_default();
        let total = issue.recipients.len() as u64;
        let mut unrecorded = 0;
        while let Some(to) = usize::try_from(progress.next).ok().and_then(|i| issue.recipients.get(i)) {
            // Not an effect: an effect would be one more record per recipient. `position` is the
            // record (see the module docs for the guarantee).
            match self.email.send(&flow, to, Email::NEWSLETTER, to) {
                Ok(()) => progress.sent += 1,
                Err(ServiceError::Rejected { .. }) => {}
                Err(e @ ServiceError::Ledger(_)) => {
                    // Not known to have happened: keep this recipient as the next one.
                    position.set(&progress).await?;
                    return Err(e.into());
                }
            }
            progress.next += 1;
            unrecorded += 1;
            if unrecorded >= self.checkpoint_every || progress.next >= total {
                position.set(&progress).await?;
                unrecorded = 0;
            }
        }
        Ok(progress.sent)
    }
}
