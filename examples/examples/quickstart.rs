//! The README's quickstart, compiled: a `welcome` flow that sends an activation mail, waits
//! durably for the customer to verify (or for a deadline), and sends a welcome mail.
//!
//! ```sh
//! cargo run -p fetter-examples --example quickstart -- --data-dir /tmp/quickstart ada
//! ```
//!
//! runs one node in this process, starts `welcome/ada` (idempotently: running the command again
//! resumes the same flow) and, after `--verify-after` seconds, sends it `EmailVerified`. Kill the
//! process (`kill -9`, Ctrl-C) while it waits and run the same command again: the activation
//! mail is not sent twice (the fake mail client prints every call), the flow picks up where its
//! journal says it is, and the process exits when the flow has finished.

use std::time::Duration;

use anyhow::{anyhow, Context as _};
use clap::Parser;
use fetter::prelude::*;
use serde::{Deserialize, Serialize};

// --- the flow (this part is in the README) ---------------------------------------------------

#[derive(Serialize, Deserialize)]
struct EmailVerified {}

impl Message for EmailVerified {
    const NAME: &'static str = "EmailVerified";
}

struct Welcome {
    mail: MailClient,
}

impl Flow for Welcome {
    const TYPE: &'static str = "welcome"; // the stable type name clients start it by
    type Input = String; // JSON in…
    type Output = bool; // …and out

    async fn run(&self, ctx: &Ctx, email: String) -> Result<bool, FlowError> {
        let token = ctx.uuid("token").await?; // the same value on every replay
        ctx.effect("activation-mail", || self.mail.activation(&email, token)).await?; // recorded once
                                                                                      // Suspends the flow (no memory, no actor) until the message or the deadline arrives.
        let verified: Option<EmailVerified> =
            ctx.message_within("verify", Duration::from_secs(24 * 3600)).await?;
        if verified.is_some() {
            ctx.effect("welcome-mail", || self.mail.welcome(&email)).await?;
        }
        Ok(verified.is_some())
    }
}

// --- a fake mail service and the program that runs the flow ----------------------------------

/// Prints every mail it "sends".
#[derive(Clone)]
struct MailClient;

impl MailClient {
    async fn activation(&self, to: &str, token: uuid::Uuid) -> Result<(), FlowError> {
        println!("mail to {to}: activate your account with {token}");
        Ok(())
    }

    async fn welcome(&self, to: &str) -> Result<(), FlowError> {
        println!("mail to {to}: welcome!");
        Ok(())
    }
}

#[derive(Parser)]
struct Args {
    /// The node's directory (reuse it to resume).
    #[arg(long, default_value = "./data/quickstart")]
    data_dir: std::path::PathBuf,
    /// Seconds before the program sends `EmailVerified`.
    #[arg(long, default_value_t = 5)]
    verify_after: u64,
    /// The customer (the flow's instance id).
    customer: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let registry = Registry::new().register(Welcome { mail: MailClient })?;
    let engine = fetter::Engine::start(fetter::EngineConfig::new(&args.data_dir), registry).await?;
    let flow = FlowId::new("welcome", &args.customer);
    let email = serde_json::to_vec(&format!("{}@example.org", args.customer))?;
    match engine.panel().start(&flow, email).await? {
        Started::New => println!("started {flow}"),
        Started::Existing(status) => println!("{flow} exists ({status:?}): resuming"),
    }
    let mut finished = engine.finished();
    if !engine.panel().get(&flow).await?.record.status.is_finished() {
        tokio::time::sleep(Duration::from_secs(args.verify_after)).await;
        // With an idempotency key: a second run of the program does not deliver a second message.
        let key = Some("verify-1".to_owned());
        engine.panel().send_message(&flow, EmailVerified::NAME, b"{}".to_vec(), key).await?;
    }
    loop {
        let view = engine.panel().get(&flow).await?;
        if view.record.status.is_finished() {
            let output = view.record.output.map(|o| String::from_utf8_lossy(&o).into_owned());
            println!("{flow}: {:?}, output {}", view.record.status, output.as_deref().unwrap_or("-"));
            break;
        }
        tokio::time::timeout(Duration::from_secs(60), finished.recv())
            .await
            .map_err(|_| anyhow!("{flow} did not finish within a minute"))?
            .context("finished-flow notifications")?;
    }
    engine.shutdown().await;
    Ok(())
}
