//! Fake external services of the seed exercises: payments, logistics, email and credit bureaus.
//!
//! They stand for the systems a flow talks to through effects. Each answers at once and
//! deterministically (the same call always gets the same answer), and each call first appends one
//! line to the [`Ledger`] — `service`, `op`, the calling `flow` as `"<type>/<instance>"`, a `key`
//! saying what the call was about, and the node id — so a test can count how many times an effect
//! really ran, across replays, failovers and processes. A service built without a ledger
//! (`None`) records nothing and answers the same.
//!
//! The ledger's names are a public contract (see [`crate::ledger`]):
//!
//! | service | op | key |
//! |---|---|---|
//! | `payment` ([`Payments`]) | `reserve`, `capture`, `cancel` | the transaction id |
//! | `logistics` ([`Logistics`]) | `ship` | the order id |
//! | `email` ([`Email`]) | `send` | `<template>:<subject>`, e.g. `order-confirmation:o-1` ([`Email::key_of`]) |
//! | `bureau` ([`CreditBureau`]) | `check` | `<bureau>:<application id>`, e.g. `bureau-a:l-1` ([`CreditBureau::key_of`]) |
//!
//! The one scripted failure: [`Logistics::ship`] answers "no" ([`ServiceError::Rejected`]) when a
//! product id starts with [`Logistics::FAIL_PREFIX`], which drives the order flow's refund path.
//!
//! The methods are synchronous: an append to the ledger is one small `write`, so they can be
//! called from an effect's closure directly.

use serde::{Deserialize, Serialize};

use crate::ledger::{Ledger, LedgerEntry, LedgerError};

/// What a fake service can answer instead of success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ServiceError {
    /// The service received the call and answered "no".
    #[error("{service} rejected the call: {reason}")]
    Rejected {
        /// The service that answered, e.g. `"logistics"`.
        service: String,
        /// Why it said no.
        reason: String,
    },
    /// The call could not be recorded in the ledger, so it is not known to have happened; it is
    /// reported as failed.
    #[error("ledger: {0}")]
    Ledger(String),
}

impl From<LedgerError> for ServiceError {
    fn from(e: LedgerError) -> Self {
        ServiceError::Ledger(e.to_string())
    }
}

/// The ledger (if any) and node id a fake service records its calls with.
#[derive(Debug, Clone)]
struct Recorder {
    ledger: Option<Ledger>,
    node: u64,
}

impl Recorder {
    fn record(&self, service: &str, op: &str, flow: &str, key: &str) -> Result<(), ServiceError> {
        match &self.ledger {
            Some(ledger) => {
                // The calling activation's epoch, as a service given a fencing token would see it.
                let epoch = fetter::activation::current().map(|a| a.epoch.0);
                let entry = LedgerEntry::new(service, op, flow, key, self.node).with_epoch(epoch);
                Ok(ledger.record(&entry)?)
            }
            None => Ok(()),
        }
    }
}

/// The payment provider: reserves an amount, then captures it or cancels it (the refund).
/// Every call succeeds; the ledger key is the transaction id.
#[derive(Debug, Clone)]
pub struct Payments {
    recorder: Recorder,
}

impl Payments {
    /// The ledger `service` of every payment call.
    pub const SERVICE: &'static str = "payment";
    /// The ledger `op` of [`Payments::reserve`].
    pub const RESERVE: &'static str = "reserve";
    /// The ledger `op` of [`Payments::capture`].
    pub const CAPTURE: &'static str = "capture";
    /// The ledger `op` of [`Payments::cancel`].
    pub const CANCEL: &'static str = "cancel";

    /// A payment provider recording to `ledger` (if any) as node `node`.
    pub fn new(ledger: Option<Ledger>, node: u64) -> Self {
        Payments { recorder: Recorder { ledger, node } }
    }

    /// Reserves `total_cents` of `customer_id`'s money under transaction `tx_id`.
    pub fn reserve(
        &self,
        flow: &str,
        tx_id: &str,
        customer_id: &str,
        total_cents: u64,
    ) -> Result<(), ServiceError> {
        // The fake accepts every reservation; the customer and amount are what a real provider
        // would check, and are not part of the ledger line.
        let _ = (customer_id, total_cents);
        self.recorder.record(Self::SERVICE, Self::RESERVE, flow, tx_id)
    }

    /// Captures the money reserved under `tx_id`.
    pub fn capture(&self, flow: &str, tx_id: &str) -> Result<(), ServiceError> {
        self.recorder.record(Self::SERVICE, Self::CAPTURE, flow, tx_id)
    }

    /// Cancels the reservation `tx_id`: the refund.
    pub fn cancel(&self, flow: &str, tx_id: &str) -> Result<(), ServiceError> {
        self.recorder.record(Self::SERVICE, Self::CANCEL, flow, tx_id)
    }
}

/// What logistics answers when it accepts a shipment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TrackAndTrace {
    /// The tracking id: `tt-<order id>`.
    pub tracking_id: String,
}

/// The logistics company: ships an order's products. The ledger key is the order id.
#[derive(Debug, Clone)]
pub struct Logistics {
    recorder: Recorder,
}

impl Logistics {
    /// The ledger `service` of every logistics call.
    pub const SERVICE: &'static str = "logistics";
    /// The ledger `op` of [`Logistics::ship`].
    pub const SHIP: &'static str = "ship";
    /// A product whose id starts with this cannot be shipped: [`Logistics::ship`] answers "no".
    pub const FAIL_PREFIX: &'static str = "fail-ship";

    /// A logistics company recording to `ledger` (if any) as node `node`.
    pub fn new(ledger: Option<Ledger>, node: u64) -> Self {
        Logistics { recorder: Recorder { ledger, node } }
    }

    /// Ships `products` of order `order_id` to `customer_id`.
    ///
    /// Answers `tt-<order_id>`, or [`ServiceError::Rejected`] if a product id starts with
    /// [`Logistics::FAIL_PREFIX`]. A rejected call is recorded too: logistics received it.
    pub fn ship(
        &self,
        flow: &str,
        order_id: &str,
        customer_id: &str,
        products: &[String],
    ) -> Result<TrackAndTrace, ServiceError> {
        // The customer is where a real company would ship to; the fake only needs the order id.
        let _ = customer_id;
        self.recorder.record(Self::SERVICE, Self::SHIP, flow, order_id)?;
        if let Some(product) = products.iter().find(|p| p.starts_with(Self::FAIL_PREFIX)) {
            return Err(ServiceError::Rejected {
                service: Self::SERVICE.to_owned(),
                reason: format!("cannot ship product {product}"),
            });
        }
        Ok(TrackAndTrace { tracking_id: format!("tt-{order_id}") })
    }
}

/// The email service: sends a templated mail. The ledger `op` is always [`Email::SEND`]; the key
/// is `<template>:<subject>` ([`Email::key_of`]), so mails of different templates about the same
/// subject (a welcome mail and a reminder to one customer) stay apart.
#[derive(Debug, Clone)]
pub struct Email {
    recorder: Recorder,
}

impl Email {
    /// The ledger `service` of every email.
    pub const SERVICE: &'static str = "email";
    /// The ledger `op` of [`Email::send`].
    pub const SEND: &'static str = "send";
    /// Template of the order flow's confirmation.
    pub const ORDER_CONFIRMATION: &'static str = "order-confirmation";
    /// Template of the signup flow's activation mail.
    pub const ACTIVATION: &'static str = "activation";
    /// Template of the signup flow's reminder.
    pub const REMINDER: &'static str = "reminder";
    /// Template of the signup flow's welcome mail.
    pub const WELCOME: &'static str = "welcome";
    /// Template of the newsletter sender.
    pub const NEWSLETTER: &'static str = "newsletter";

    /// An email service recording to `ledger` (if any) as node `node`.
    pub fn new(ledger: Option<Ledger>, node: u64) -> Self {
        Email { recorder: Recorder { ledger, node } }
    }

    /// The ledger key of the mail `template` about `subject`: `<template>:<subject>`.
    pub fn key_of(template: &str, subject: &str) -> String {
        format!("{template}:{subject}")
    }

    /// Sends the mail `template` to `to`; `key` says what it is about (an order id, a customer
    /// id, a recipient's address) and the ledger key is [`Email::key_of`]`(template, key)`. An
    /// empty recipient is rejected (after being recorded).
    pub fn send(&self, flow: &str, to: &str, template: &str, key: &str) -> Result<(), ServiceError> {
        self.recorder.record(Self::SERVICE, Self::SEND, flow, &Self::key_of(template, key))?;
        if to.is_empty() {
            return Err(ServiceError::Rejected {
                service: Self::SERVICE.to_owned(),
                reason: format!("mail {template} for {key} has no recipient"),
            });
        }
        Ok(())
    }
}

/// A credit bureau of the loan application. A check is requested here; the bureau's verdict
/// arrives later as a message to the flow, not as this call's answer. Every bureau records
/// service [`CreditBureau::SERVICE`] and op [`CreditBureau::CHECK`]; the key
/// `<name>:<application id>` ([`CreditBureau::key_of`]) says which bureau was asked about what.
#[derive(Debug, Clone)]
pub struct CreditBureau {
    name: String,
    recorder: Recorder,
}

impl CreditBureau {
    /// The ledger `service` of every bureau.
    pub const SERVICE: &'static str = "bureau";
    /// The ledger `op` of [`CreditBureau::request_check`].
    pub const CHECK: &'static str = "check";

    /// The bureau `name`, recording to `ledger` (if any) as node `node`.
    pub fn new(name: impl Into<String>, ledger: Option<Ledger>, node: u64) -> Self {
        CreditBureau { name: name.into(), recorder: Recorder { ledger, node } }
    }

    /// The ledger key of a check by the bureau `name` for `application_id`:
    /// `<name>:<application_id>`.
    pub fn key_of(name: &str, application_id: &str) -> String {
        format!("{name}:{application_id}")
    }

    /// This bureau's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Asks for a credit check of `customer_id` borrowing `amount_cents` in application
    /// `application_id`. Always accepted; the verdict comes later, as a message.
    pub fn request_check(
        &self,
        flow: &str,
        application_id: &str,
        customer_id: &str,
        amount_cents: u64,
    ) -> Result<(), ServiceError> {
        // What a real bureau would assess; the fake only records that it was asked.
        let _ = (customer_id, amount_cents);
        self.recorder.record(Self::SERVICE, Self::CHECK, flow, &Self::key_of(&self.name, application_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{count, count_key, count_op};

    fn ledger() -> (tempfile::TempDir, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path().join("ledger.jsonl")).unwrap();
        (dir, ledger)
    }

    fn products(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn payments_record_each_call() {
        let (_dir, ledger) = ledger();
        let payments = Payments::new(Some(ledger.clone()), 2);
        payments.reserve("order/o-1", "tx-1", "c-1", 1_999).unwrap();
        payments.capture("order/o-1", "tx-1").unwrap();
        payments.reserve("order/o-2", "tx-2", "c-2", 500).unwrap();
        payments.cancel("order/o-2", "tx-2").unwrap();

        let entries = Ledger::read_all(ledger.path()).unwrap();
        assert_eq!(entries.len(), 4);
        assert_eq!(
            (entries[0].service.as_str(), entries[0].op.as_str(), entries[0].key.as_str()),
            ("payment", "reserve", "tx-1")
        );
        assert!(entries.iter().all(|e| e.node == 2));
        assert_eq!(count(&entries, Payments::SERVICE, Payments::RESERVE, "order/o-1"), 1);
        assert_eq!(count(&entries, Payments::SERVICE, Payments::CAPTURE, "order/o-1"), 1);
        assert_eq!(count(&entries, Payments::SERVICE, Payments::CANCEL, "order/o-1"), 0);
        assert_eq!(count(&entries, Payments::SERVICE, Payments::CANCEL, "order/o-2"), 1);
        assert_eq!(count_op(&entries, Payments::SERVICE, Payments::RESERVE), 2);
    }

    #[test]
    fn logistics_ships_with_a_deterministic_tracking_id() {
        let (_dir, ledger) = ledger();
        let logistics = Logistics::new(Some(ledger.clone()), 1);
        let track = logistics.ship("order/o-7", "o-7", "c-1", &products(&["p-1", "p-2"])).unwrap();
        assert_eq!(track, TrackAndTrace { tracking_id: "tt-o-7".into() });
        let again = logistics.ship("order/o-7", "o-7", "c-1", &products(&["p-1", "p-2"])).unwrap();
        assert_eq!(again, track);
        assert_eq!(serde_json::to_string(&track).unwrap(), r#"{"tracking_id":"tt-o-7"}"#);

        let entries = Ledger::read_all(ledger.path()).unwrap();
        assert_eq!(count(&entries, Logistics::SERVICE, Logistics::SHIP, "order/o-7"), 2);
        assert!(entries.iter().all(|e| e.key == "o-7"));
    }

    #[test]
    fn fail_ship_products_are_rejected_and_still_recorded() {
        let (_dir, ledger) = ledger();
        let logistics = Logistics::new(Some(ledger.clone()), 1);
        let err = logistics.ship("order/o-8", "o-8", "c-1", &products(&["p-1", "fail-ship-42"])).unwrap_err();
        match &err {
            ServiceError::Rejected { service, reason } => {
                assert_eq!(service, "logistics");
                assert!(reason.contains("fail-ship-42"), "{reason}");
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        // The error travels through the journal as JSON and comes back equal.
        let json = serde_json::to_string(&err).unwrap();
        assert_eq!(serde_json::from_str::<ServiceError>(&json).unwrap(), err);

        let entries = Ledger::read_all(ledger.path()).unwrap();
        assert_eq!(count(&entries, Logistics::SERVICE, Logistics::SHIP, "order/o-8"), 1);
    }

    #[test]
    fn email_op_is_send_and_the_key_names_the_template() {
        let (_dir, ledger) = ledger();
        let email = Email::new(Some(ledger.clone()), 3);
        email.send("order/o-1", "c-1", Email::ORDER_CONFIRMATION, "o-1").unwrap();
        email.send("signup/c-2", "c-2", Email::ACTIVATION, "c-2").unwrap();
        email.send("signup/c-2", "c-2", Email::REMINDER, "c-2").unwrap();
        email.send("signup/c-2", "c-2", Email::WELCOME, "c-2").unwrap();
        email.send("newsletter/2024-06", "c-3", Email::NEWSLETTER, "c-3").unwrap();
        let err = email.send("newsletter/2024-06", "", Email::NEWSLETTER, "c-4").unwrap_err();
        assert!(matches!(err, ServiceError::Rejected { .. }), "{err}");

        let entries = Ledger::read_all(ledger.path()).unwrap();
        assert_eq!(entries.len(), 6);
        assert!(entries.iter().all(|e| e.service == "email" && e.op == "send"), "{entries:?}");
        assert_eq!(count_op(&entries, Email::SERVICE, Email::SEND), 6);
        assert_eq!(entries[0].key, "order-confirmation:o-1");
        assert_eq!(count_key(&entries, "email", "send", "order/o-1", "order-confirmation:o-1"), 1);
        for template in ["activation", "reminder", "welcome"] {
            let key = Email::key_of(template, "c-2");
            assert_eq!(key, format!("{template}:c-2"));
            assert_eq!(count_key(&entries, Email::SERVICE, Email::SEND, "signup/c-2", &key), 1, "{template}");
        }
        assert_eq!(count(&entries, Email::SERVICE, Email::SEND, "signup/c-2"), 3);
        assert_eq!(count(&entries, Email::SERVICE, Email::SEND, "newsletter/2024-06"), 2);
        // The rejected mail was recorded too, under its own key.
        let rejected = Email::key_of(Email::NEWSLETTER, "c-4");
        assert_eq!(count_key(&entries, Email::SERVICE, Email::SEND, "newsletter/2024-06", &rejected), 1);
    }

    #[test]
    fn credit_bureaus_record_checks_keyed_by_their_name() {
        let (_dir, ledger) = ledger();
        let bureaus: Vec<CreditBureau> =
            ["a", "b", "c"].into_iter().map(|n| CreditBureau::new(n, Some(ledger.clone()), 1)).collect();
        for bureau in &bureaus {
            bureau.request_check("loan/l-1", "l-1", "c-1", 1_000_000).unwrap();
        }
        assert_eq!(bureaus[1].name(), "b");

        let entries = Ledger::read_all(ledger.path()).unwrap();
        assert!(entries.iter().all(|e| e.service == "bureau" && e.op == "check"), "{entries:?}");
        assert_eq!(count(&entries, CreditBureau::SERVICE, CreditBureau::CHECK, "loan/l-1"), 3);
        for name in ["a", "b", "c"] {
            let key = CreditBureau::key_of(name, "l-1");
            assert_eq!(key, format!("{name}:l-1"));
            assert_eq!(count_key(&entries, "bureau", "check", "loan/l-1", &key), 1, "{name}");
        }
    }

    #[test]
    fn without_a_ledger_services_answer_the_same() {
        let payments = Payments::new(None, 1);
        payments.reserve("order/o-1", "tx-1", "c-1", 100).unwrap();
        let logistics = Logistics::new(None, 1);
        assert_eq!(
            logistics.ship("order/o-1", "o-1", "c-1", &products(&["p"])).unwrap().tracking_id,
            "tt-o-1"
        );
        assert!(logistics.ship("order/o-1", "o-1", "c-1", &products(&["fail-ship"])).is_err());
        Email::new(None, 1).send("signup/c", "c", Email::WELCOME, "c").unwrap();
        CreditBureau::new("a", None, 1).request_check("loan/l", "l", "c", 1).unwrap();
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_failed_append_fails_the_call() {
        // Every write to /dev/full fails with ENOSPC.
        let ledger = Ledger::open("/dev/full").unwrap();
        let err = Payments::new(Some(ledger), 1).capture("order/o-1", "tx-1").unwrap_err();
        assert!(matches!(&err, ServiceError::Ledger(msg) if msg.contains("/dev/full")), "{err}");
    }

    #[test]
    fn services_are_clone_send_sync() {
        fn assert_traits<T: Clone + Send + Sync + 'static>() {}
        assert_traits::<Payments>();
        assert_traits::<Logistics>();
        assert_traits::<Email>();
        assert_traits::<CreditBureau>();
    }
}
