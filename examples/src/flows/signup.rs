//! Signup with email verification and reminders.
//!
//! The flow mails an activation link (`activation`), then waits for the message
//! [`EmailVerified`] (`{}`, sent to `signup/<customer id>` when the customer clicks the link) for
//! one reminder interval (`verify-0`). Each time an interval passes without it, a reminder goes
//! out (`reminder-1` .. `reminder-3`) and the flow waits another interval (`verify-1` ..
//! `verify-3`). Verified, it mails the welcome (`welcome`) and succeeds; after the third reminder's
//! interval it fails with kind [`NOT_VERIFIED`]. Every wait has its own durable timer, so a
//! waiting signup costs only disk, and a replay keeps the deadlines it armed.

use std::time::Duration;

use fetter::prelude::*;
use serde::{Deserialize, Serialize};

use crate::fakes::Email;

/// The input of `signup`: a public contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signup {
    /// Who signs up; the instance of the flow and the subject of its mails (ledger key
    /// `<template>:<customer id>`, e.g. `reminder:c-1`).
    pub customer_id: String,
    /// Where the mails go.
    pub email: String,
    /// How long to wait for the verification before each reminder, in milliseconds (default:
    /// [`DEFAULT_REMINDER_INTERVAL`], one day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reminder_interval_ms: Option<u64>,
}

/// The output of a verified `signup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignupOutcome {
    /// Who is verified.
    pub customer_id: String,
    /// How many reminders it took (0 to [`MAX_REMINDERS`]).
    pub reminders: u32,
}

/// The customer verified their email address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailVerified {}

impl Message for EmailVerified {
    const NAME: &'static str = "EmailVerified";
}

/// The reminder interval when the input names none: one day.
pub const DEFAULT_REMINDER_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Reminders sent before giving up.
pub const MAX_REMINDERS: u32 = 3;
/// The error kind of a signup never verified.
pub const NOT_VERIFIED: &str = "not_verified";

/// The `signup` flow and the email service it mails with.
pub struct SignupFlow {
    email: Email,
}

impl SignupFlow {
    /// A signup flow over `email`.
    pub fn new(email: Email) -> Self {
        SignupFlow { email }
    }
}

impl Flow for SignupFlow {
    const TYPE: &'static str = "signup";
    type Input = Signup;
    type Output = SignupOutcome;

    async fn run(&self, ctx: &Ctx, signup: Signup) -> Result<SignupOutcome, FlowError> {
        let flow = ctx.flow().to_string();
        let interval = signup.reminder_interval_ms.map_or(DEFAULT_REMINDER_INTERVAL, Duration::from_millis);
        let mail = |template: &'static str| {
            let (flow, signup) = (&flow, &signup);
            move || async move { self.email.send(flow, &signup.email, template, &signup.customer_id) }
        };
        ctx.effect("activation", mail(Email::ACTIVATION)).await?;
        for reminders in 0..=MAX_REMINDERS {
            if reminders > 0 {
                ctx.effect(format!("reminder-{reminders}"), mail(Email::REMINDER)).await?;
            }
            if ctx.message_within::<EmailVerified>(format!("verify-{reminders}"), interval).await?.is_some() {
                ctx.effect("welcome", mail(Email::WELCOME)).await?;
                return Ok(SignupOutcome { customer_id: signup.customer_id.clone(), reminders });
            }
        }
        Err(FlowError::new(
            NOT_VERIFIED,
            format!("{} did not verify {} after {MAX_REMINDERS} reminders", signup.customer_id, signup.email),
        ))
    }
}
