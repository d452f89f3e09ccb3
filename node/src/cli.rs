//! The client half of every fetter application's command line: `flow …` and `cluster …`.
//!
//! The application parses [`AddrArg`] (the global `--addr`) and [`ClientCommand`] with clap and
//! calls [`run_client`]; on an error it prints `error: <message>` to stderr and exits with
//! [`CliError::exit_code`].
//!
//! ```text
//! flow start <type> <instance> --input '<json>' [--wait] [--timeout <secs>]
//! flow send <type> <instance> <message-type> '<json>' [--key <idempotency-key>]
//! flow get <type> <instance> [--json]
//! flow list [--type <t>] [--status <s>] [--limit <n>] [--cursor <c>] [--json]
//! flow dead-letters [<type> <instance>] [--limit <n>] [--cursor <c>] [--json]
//! flow restart <type> <instance> [--input '<json>'] [--clear-effects] [--epoch <e>]
//! flow cancel|delete <type> <instance> [--epoch <e>]
//! flow succeed <type> <instance> '<json>' [--epoch <e>]
//! flow fail <type> <instance> '<reason>' [--epoch <e>]
//! flow effect-set <type> <instance> <effect-id> '<json>' [--epoch <e>]
//! flow effect-remove <type> <instance> <effect-id> [--epoch <e>]
//! cluster status [--json]
//! cluster add-node --id <n> --addr <host:port>
//! cluster remove-node --id <n>
//! ```

use std::io::Write;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::Value;

use crate::client::{Client, ClientError};
use crate::proto;

/// The time budget of one command's call (retries included), besides a `--wait`.
const CLI_TIMEOUT: Duration = Duration::from_secs(10);
/// The bound of `flow start --wait` without `--timeout`.
const DEFAULT_WAIT_SECS: u64 = 30;

/// The node the client commands talk to: the global `--addr` (env `FETTER_ADDR`).
#[derive(Args, Debug, Clone)]
pub struct AddrArg {
    /// The node to talk to (host:port; several separated by commas are tried in turn).
    #[arg(long, global = true, env = "FETTER_ADDR", default_value = "127.0.0.1:7001")]
    pub addr: String,
}

/// Client commands of the CLI.
// No `about` of its own: flattened into an application's commands, it would become the
// application's.
#[derive(Subcommand, Debug, Clone)]
#[command(about = None, long_about = None)]
pub enum ClientCommand {
    /// Start, inspect and repair flows.
    #[command(subcommand)]
    Flow(FlowCommand),
    /// Inspect and change the cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

/// A flow: its type and instance.
#[derive(Args, Debug, Clone)]
pub struct FlowTarget {
    /// The flow type.
    #[arg(value_name = "TYPE")]
    pub flow_type: String,
    /// The flow instance.
    #[arg(value_name = "INSTANCE")]
    pub instance: String,
}

impl FlowTarget {
    fn name(&self) -> String {
        format!("{}/{}", self.flow_type, self.instance)
    }
}

/// `flow …` commands.
#[derive(Subcommand, Debug, Clone)]
pub enum FlowCommand {
    /// Start a flow (idempotent: the same input again is acknowledged).
    Start {
        /// The flow.
        #[command(flatten)]
        flow: FlowTarget,
        /// The input, as JSON.
        #[arg(long, value_name = "JSON", allow_hyphen_values = true)]
        input: String,
        /// Wait until the flow has finished and print its result.
        #[arg(long)]
        wait: bool,
        /// Bound on the wait, in seconds (default 30).
        #[arg(long, value_name = "SECS", requires = "wait")]
        timeout: Option<u64>,
    },
    /// Send a message to a flow (once per idempotency key).
    Send {
        /// The flow.
        #[command(flatten)]
        flow: FlowTarget,
        /// The message type.
        #[arg(value_name = "MESSAGE_TYPE")]
        message_type: String,
        /// The message, as JSON.
        #[arg(value_name = "JSON", allow_hyphen_values = true)]
        payload: String,
        /// The idempotency key (default: the call's request id, kept across its retries).
        #[arg(long)]
        key: Option<String>,
    },
    /// Show a flow with its journal.
    Get {
        /// The flow.
        #[command(flatten)]
        flow: FlowTarget,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List flows, one page at a time.
    List {
        /// Only flows of this type.
        #[arg(long = "type", value_name = "TYPE")]
        flow_type: Option<String>,
        /// Only flows in this status (running, suspended, postponed, succeeded, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// At most this many flows (default 100).
        #[arg(long)]
        limit: Option<u32>,
        /// Continue after this cursor (the `next` of the previous page).
        #[arg(long)]
        cursor: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List messages from flows that their target could not take (it did not exist or had
    /// finished): of one target flow (which need not exist), or of all.
    DeadLetters {
        /// The target flow's type (with its instance).
        #[arg(value_name = "TYPE", requires = "instance")]
        flow_type: Option<String>,
        /// The target flow's instance.
        #[arg(value_name = "INSTANCE")]
        instance: Option<String>,
        /// At most this many letters (default 100).
        #[arg(long)]
        limit: Option<u32>,
        /// Continue after this cursor (the `next` of the previous page).
        #[arg(long)]
        cursor: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Run a flow again (a finished one too).
    Restart {
        /// The flow.
        #[command(flatten)]
        flow: FlowTarget,
        /// A new input, as JSON.
        #[arg(long, value_name = "JSON", allow_hyphen_values = true)]
        input: Option<String>,
        /// Start afresh, forgetting the recorded effects.
        #[arg(long)]
        clear_effects: bool,
        /// Refuse if the flow's epoch is no longer this one.
        #[arg(long)]
        epoch: Option<u64>,
    },
    /// Cancel a live flow.
    Cancel {
        /// The flow.
        #[command(flatten)]
        flow: FlowTarget,
        /// Refuse if the flow's epoch is no longer this one.
        #[arg(long)]
        epoch: Option<u64>,
    },
    /// Delete a flow and its journal.
    Delete {
        /// The flow.
        #[command(flatten)]
        flow: FlowTarget,
        /// Refuse if the flow's epoch is no longer this one.
        #[arg(long)]
        epoch: Option<u64>,
    },
    /// Finish a live flow as succeeded with an output.
    Succeed {
        /// The flow.
        #[command(flatten)]
        flow: FlowTarget,
        /// The output, as JSON.
        #[arg(value_name = "JSON", allow_hyphen_values = true)]
        output: String,
        /// Refuse if the flow's epoch is no longer this one.
        #[arg(long)]
        epoch: Option<u64>,
    },
    /// Finish a live flow as failed.
    Fail {
        /// The flow.
        #[command(flatten)]
        flow: FlowTarget,
        /// Why (text).
        #[arg(value_name = "REASON", allow_hyphen_values = true)]
        reason: String,
        /// Refuse if the flow's epoch is no longer this one.
        #[arg(long)]
        epoch: Option<u64>,
    },
    /// Record the value an effect returns on replay.
    EffectSet {
        /// The flow.
        #[command(flatten)]
        flow: FlowTarget,
        /// The effect's id.
        #[arg(value_name = "EFFECT_ID")]
        effect_id: String,
        /// The value, as JSON.
        #[arg(value_name = "JSON", allow_hyphen_values = true)]
        value: String,
        /// Refuse if the flow's epoch is no longer this one.
        #[arg(long)]
        epoch: Option<u64>,
    },
    /// Forget an effect, so a replay runs it again.
    EffectRemove {
        /// The flow.
        #[command(flatten)]
        flow: FlowTarget,
        /// The effect's id.
        #[arg(value_name = "EFFECT_ID")]
        effect_id: String,
        /// Refuse if the flow's epoch is no longer this one.
        #[arg(long)]
        epoch: Option<u64>,
    },
}

/// `cluster …` commands.
#[derive(Subcommand, Debug, Clone)]
pub enum ClusterCommand {
    /// Show the members and every shard's leader and replicas.
    Status {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Add a node to the cluster.
    AddNode {
        /// The new node's id.
        #[arg(long)]
        id: u64,
        /// The new node's address (host:port).
        #[arg(long = "addr", id = "node_addr", value_name = "HOST:PORT")]
        node_addr: String,
        /// The node to send the request to (the global `--addr`). Declared here under the
        /// global's id so that this command's own `--addr` does not clash with it.
        #[arg(long = "via", id = "addr", value_name = "HOST:PORT", hide = true)]
        via: Option<String>,
    },
    /// Remove a node from the cluster.
    RemoveNode {
        /// The node's id.
        #[arg(long)]
        id: u64,
    },
    /// Read or change the cluster's parameters (the same on every node).
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// `cluster config …` commands.
#[derive(Subcommand, Debug, Clone)]
pub enum ConfigCommand {
    /// Show the cluster's parameters.
    Get {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Change one parameter cluster-wide: `retention-secs` or `max-payload-bytes`.
    Set {
        /// The parameter.
        #[arg(value_enum)]
        name: ConfigName,
        /// Its new value (a whole number).
        value: u64,
    },
}

/// The cluster parameters `cluster config set` changes.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigName {
    /// How long finished flows are kept, in seconds.
    RetentionSecs,
    /// The largest user payload, in bytes.
    MaxPayloadBytes,
}

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// An argument was refused before any call (e.g. JSON that does not parse).
    #[error("{0}")]
    Invalid(String),
    /// The command line does not make sense (exit code 2).
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    /// The process exit code: 2 for usage errors, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Client(_) | CliError::Invalid(_) => 1,
        }
    }
}

/// Runs a client command against the node(s) at `addr` (`host:port`, or several separated by
/// commas) and prints its result to stdout.
pub async fn run_client(command: ClientCommand, addr: &str) -> Result<(), CliError> {
    let addrs: Vec<&str> = addr.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
    let client = Client::connect(addrs)
        .map_err(|e| CliError::Usage(format!("--addr {addr:?}: {e}")))?
        .with_timeout(CLI_TIMEOUT);
    let output = execute(&client, command).await?;
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (`| head`) is not the command's failure.
    let _ = stdout.write_all(output.as_bytes()).and_then(|()| stdout.flush());
    Ok(())
}

/// Runs `command`; returns what to print.
async fn execute(client: &Client, command: ClientCommand) -> Result<String, CliError> {
    match command {
        ClientCommand::Flow(command) => flow_command(client, command).await,
        ClientCommand::Cluster(command) => cluster_command(client, command).await,
    }
}

async fn flow_command(client: &Client, command: FlowCommand) -> Result<String, CliError> {
    Ok(match command {
        FlowCommand::Start { flow, input, wait, timeout } => {
            check_json("input", &input)?;
            let timeout = wait.then(|| Duration::from_secs(timeout.unwrap_or(DEFAULT_WAIT_SECS)));
            let response = client.start_flow(&flow.flow_type, &flow.instance, &input, wait, timeout).await?;
            start_text(&flow.name(), &response, wait)
        }
        FlowCommand::Send { flow, message_type, payload, key } => {
            check_json("message", &payload)?;
            let seq =
                client.send_message(&flow.flow_type, &flow.instance, &message_type, &payload, key).await?;
            format!("sent (seq {seq})\n")
        }
        FlowCommand::Get { flow, json } => {
            let flow = client.get_flow(&flow.flow_type, &flow.instance).await?;
            if json {
                json_line(&flow_doc(&flow))?
            } else {
                flow_text(&flow)
            }
        }
        FlowCommand::List { flow_type, status, limit, cursor, json } => {
            let page = client
                .list_flows(flow_type.as_deref(), status.as_deref(), limit.unwrap_or(0), cursor.as_deref())
                .await?;
            if json {
                json_line(&list_doc(&page))?
            } else {
                list_text(&page)
            }
        }
        FlowCommand::DeadLetters { flow_type, instance, limit, cursor, json } => {
            let flow = flow_type.as_deref().zip(instance.as_deref());
            let page = client.list_dead_letters(flow, limit.unwrap_or(0), cursor.as_deref()).await?;
            if json {
                json_line(&letters_doc(&page))?
            } else {
                letters_text(&page)
            }
        }
        FlowCommand::Restart { flow, input, clear_effects, epoch } => {
            if let Some(input) = &input {
                check_json("input", input)?;
            }
            let r = client
                .restart(&flow.flow_type, &flow.instance, input.as_deref(), clear_effects, epoch)
                .await?;
            format!("restarted {}{}\n", flow.name(), epoch_text(&r))
        }
        FlowCommand::Cancel { flow, epoch } => {
            let r = client.cancel(&flow.flow_type, &flow.instance, epoch).await?;
            format!("cancelled {}{}\n", flow.name(), epoch_text(&r))
        }
        FlowCommand::Delete { flow, epoch } => {
            let r = client.delete(&flow.flow_type, &flow.instance, epoch).await?;
            format!("deleted {}{}\n", flow.name(), epoch_text(&r))
        }
        FlowCommand::Succeed { flow, output, epoch } => {
            check_json("output", &output)?;
            let r = client.mark_succeeded(&flow.flow_type, &flow.instance, &output, epoch).await?;
            format!("marked {} succeeded{}\n", flow.name(), epoch_text(&r))
        }
        FlowCommand::Fail { flow, reason, epoch } => {
            let r = client.mark_failed(&flow.flow_type, &flow.instance, &reason, epoch).await?;
            format!("marked {} failed{}\n", flow.name(), epoch_text(&r))
        }
        FlowCommand::EffectSet { flow, effect_id, value, epoch } => {
            check_json("value", &value)?;
            let r = client.set_effect(&flow.flow_type, &flow.instance, &effect_id, &value, epoch).await?;
            format!("set effect {effect_id} of {}{}\n", flow.name(), epoch_text(&r))
        }
        FlowCommand::EffectRemove { flow, effect_id, epoch } => {
            let r = client.remove_effect(&flow.flow_type, &flow.instance, &effect_id, epoch).await?;
            format!("removed effect {effect_id} of {}{}\n", flow.name(), epoch_text(&r))
        }
    })
}

async fn cluster_command(client: &Client, command: ClusterCommand) -> Result<String, CliError> {
    Ok(match command {
        ClusterCommand::Status { json } => {
            let status = client.cluster_status().await?;
            if json {
                json_line(&cluster_doc(&status))?
            } else {
                cluster_status_text(&status)
            }
        }
        ClusterCommand::AddNode { id, node_addr, via: _ } => {
            client.add_node(id, &node_addr).await?;
            format!("added node {id} ({node_addr})\n")
        }
        ClusterCommand::RemoveNode { id } => {
            client.remove_node(id).await?;
            format!("removed node {id}\n")
        }
        ClusterCommand::Config(ConfigCommand::Get { json }) => {
            config_text(&client.cluster_config().await?, json)?
        }
        ClusterCommand::Config(ConfigCommand::Set { name, value }) => {
            let config = match name {
                ConfigName::RetentionSecs => {
                    client.set_cluster_config(Some(Duration::from_secs(value)), None).await?
                }
                ConfigName::MaxPayloadBytes => client.set_cluster_config(None, Some(value)).await?,
            };
            config_text(&config, false)?
        }
    })
}

/// The cluster's parameters, as text or one JSON object.
fn config_text(config: &proto::ClusterConfig, json: bool) -> Result<String, CliError> {
    let retention_secs = config.retention_ms / 1000;
    if json {
        let doc = serde_json::json!({
            "shard_count": config.shard_count,
            "retention_secs": retention_secs,
            "max_payload_bytes": config.max_payload_bytes,
        });
        return json_line(&doc);
    }
    Ok(format!(
        "shard-count        {}\nretention-secs     {retention_secs}\nmax-payload-bytes  {}\n",
        config.shard_count, config.max_payload_bytes
    ))
}

/// Refuses a JSON argument that does not parse, before any call.
fn check_json(what: &str, text: &str) -> Result<(), CliError> {
    serde_json::from_str::<Value>(text)
        .map(drop)
        .map_err(|e| CliError::Invalid(format!("{what} is not valid JSON: {e}")))
}

/// A JSON text as a value: null when empty, the text itself as a string if it does not parse.
fn json_value(text: &str) -> Value {
    if text.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

fn optional_json_value(text: Option<&str>) -> Value {
    text.map_or(Value::Null, json_value)
}

// The JSON documents, as structs so that their keys keep this order when printed.

#[derive(Serialize)]
struct FlowDoc<'a> {
    #[serde(rename = "type")]
    flow_type: &'a str,
    instance: &'a str,
    status: &'a str,
    error_kind: Option<&'a str>,
    error: Option<&'a str>,
    epoch: u64,
    input: Value,
    output: Value,
    effects: Vec<EffectDoc<'a>>,
    events: Vec<EventDoc<'a>>,
    timers: Vec<TimerDoc<'a>>,
    dead_letters: Vec<LetterDoc<'a>>,
    leader_node: Option<u64>,
    parent: Option<String>,
    created_ms: u64,
    finished_ms: Option<u64>,
    postponed_until_ms: Option<u64>,
    note: Option<&'a str>,
}

#[derive(Serialize)]
struct EffectDoc<'a> {
    id: &'a str,
    kind: &'a str,
    state: &'a str,
    value: Value,
}

#[derive(Serialize)]
struct EventDoc<'a> {
    seq: u64,
    kind: &'a str,
    name: &'a str,
    payload: Value,
}

#[derive(Serialize)]
struct TimerDoc<'a> {
    id: &'a str,
    deadline_ms: u64,
}

#[derive(Serialize)]
struct LetterDoc<'a> {
    target: String,
    seq: u64,
    sender: Option<String>,
    message_type: &'a str,
    payload: Value,
    idempotency_key: Option<&'a str>,
    reason: &'a str,
    target_status: Option<&'a str>,
    at_ms: u64,
}

#[derive(Serialize)]
struct LettersDoc<'a> {
    letters: Vec<LetterDoc<'a>>,
    next: Option<&'a str>,
}

fn ref_text(flow: Option<&proto::FlowRef>) -> Option<String> {
    flow.map(|f| format!("{}/{}", f.flow_type, f.instance))
}

fn letter_doc(l: &proto::DeadLetter) -> LetterDoc<'_> {
    LetterDoc {
        target: ref_text(l.target.as_ref()).unwrap_or_default(),
        seq: l.seq,
        sender: ref_text(l.sender.as_ref()),
        message_type: &l.message_type,
        payload: json_value(&l.payload_json),
        idempotency_key: l.idempotency_key.as_deref(),
        reason: &l.reason,
        target_status: l.target_status.as_deref(),
        at_ms: l.at_ms,
    }
}

fn letters_doc(page: &proto::ListDeadLettersResponse) -> LettersDoc<'_> {
    LettersDoc { letters: page.letters.iter().map(letter_doc).collect(), next: page.next.as_deref() }
}

/// Dead letters, one line each.
fn letters_table(letters: &[proto::DeadLetter]) -> String {
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|l| {
            let reason = match &l.target_status {
                Some(status) => format!("{} ({status})", l.reason),
                None => l.reason.clone(),
            };
            vec![
                ref_text(l.target.as_ref()).unwrap_or_default(),
                l.seq.to_string(),
                ref_text(l.sender.as_ref()).unwrap_or_else(|| "-".into()),
                reason,
                l.message_type.clone(),
                l.payload_json.clone(),
            ]
        })
        .collect();
    table(&["TARGET", "SEQ", "SENDER", "REASON", "TYPE", "PAYLOAD"], &rows)
}

/// A page of dead letters, human readable.
fn letters_text(page: &proto::ListDeadLettersResponse) -> String {
    let mut out =
        if page.letters.is_empty() { "no dead letters\n".to_string() } else { letters_table(&page.letters) };
    if let Some(next) = &page.next {
        out.push_str(&format!("more: --cursor {next}\n"));
    }
    out
}

#[derive(Serialize)]
struct ListDoc<'a> {
    flows: Vec<SummaryDoc<'a>>,
    next: Option<&'a str>,
}

#[derive(Serialize)]
struct SummaryDoc<'a> {
    #[serde(rename = "type")]
    flow_type: &'a str,
    instance: &'a str,
    status: &'a str,
    error_kind: Option<&'a str>,
    epoch: u64,
}

#[derive(Serialize)]
struct ClusterDoc<'a> {
    cluster_id: &'a str,
    members: Vec<MemberDoc<'a>>,
    shards: Vec<ShardDoc<'a>>,
}

#[derive(Serialize)]
struct MemberDoc<'a> {
    id: u64,
    addr: &'a str,
    alive: bool,
}

#[derive(Serialize)]
struct ShardDoc<'a> {
    id: u32,
    leader: Option<u64>,
    replicas: &'a [u64],
}

fn flow_doc(flow: &proto::Flow) -> FlowDoc<'_> {
    FlowDoc {
        flow_type: &flow.flow_type,
        instance: &flow.instance,
        status: &flow.status,
        error_kind: flow.error_kind.as_deref(),
        error: flow.error.as_deref(),
        epoch: flow.epoch,
        input: json_value(&flow.input_json),
        output: optional_json_value(flow.output_json.as_deref()),
        effects: flow
            .effects
            .iter()
            .map(|e| EffectDoc {
                id: &e.id,
                kind: &e.kind,
                state: &e.state,
                value: json_value(&e.value_json),
            })
            .collect(),
        events: flow
            .events
            .iter()
            .map(|e| EventDoc {
                seq: e.seq,
                kind: &e.kind,
                name: &e.name,
                payload: json_value(&e.payload_json),
            })
            .collect(),
        timers: flow.timers.iter().map(|t| TimerDoc { id: &t.id, deadline_ms: t.deadline_ms }).collect(),
        dead_letters: flow.dead_letters.iter().map(letter_doc).collect(),
        leader_node: flow.leader_node,
        parent: flow.parent.as_ref().map(|p| format!("{}/{}", p.flow_type, p.instance)),
        created_ms: flow.created_ms,
        finished_ms: flow.finished_ms,
        postponed_until_ms: flow.postponed_until_ms,
        note: flow.note.as_deref(),
    }
}

fn list_doc(page: &proto::ListFlowsResponse) -> ListDoc<'_> {
    ListDoc {
        flows: page
            .flows
            .iter()
            .map(|f| SummaryDoc {
                flow_type: &f.flow_type,
                instance: &f.instance,
                status: &f.status,
                error_kind: f.error_kind.as_deref(),
                epoch: f.epoch,
            })
            .collect(),
        next: page.next.as_deref(),
    }
}

fn cluster_doc(status: &proto::ClusterStatusResponse) -> ClusterDoc<'_> {
    ClusterDoc {
        cluster_id: &status.cluster_id,
        members: status
            .members
            .iter()
            .map(|m| MemberDoc { id: m.id, addr: &m.addr, alive: m.alive })
            .collect(),
        shards: status
            .shards
            .iter()
            .map(|s| ShardDoc { id: s.id, leader: s.leader, replicas: &s.replicas })
            .collect(),
    }
}

/// A document as a JSON value (these documents always convert).
fn to_value(doc: &impl Serialize) -> Value {
    serde_json::to_value(doc).unwrap_or(Value::Null)
}

/// A document on one line, its keys in declaration order.
fn json_line(doc: &impl Serialize) -> Result<String, CliError> {
    let text = serde_json::to_string(doc).map_err(ClientError::from)?;
    Ok(format!("{text}\n"))
}

/// A flow as the JSON object `flow get --json` prints: `type`, `instance`, `status`,
/// `error_kind`, `error`, `epoch`, `input`, `output`, `effects` (`id`, `kind`, `state`, `value`),
/// `events` (`seq`, `kind`, `name`, `payload`), `timers` (`id`, `deadline_ms`), `dead_letters`
/// (`target`, `seq`, `sender`, `message_type`, `payload`, `idempotency_key`, `reason`,
/// `target_status`, `at_ms`), `leader_node`,
/// `parent` (`"type/instance"`), `created_ms`, `finished_ms`, `postponed_until_ms`, `note`. JSON texts
/// are parsed (null when absent or empty).
pub fn flow_json(flow: &proto::Flow) -> Value {
    to_value(&flow_doc(flow))
}

/// A page of flows as the JSON object `flow list --json` prints:
/// `{"flows":[{"type","instance","status","error_kind","epoch"}…],"next":…}`.
pub fn list_json(page: &proto::ListFlowsResponse) -> Value {
    to_value(&list_doc(page))
}

/// The cluster's status as the JSON object `cluster status --json` prints:
/// `{"cluster_id","members":[{"id","addr","alive"}…],"shards":[{"id","leader","replicas"}…]}`.
pub fn cluster_status_json(status: &proto::ClusterStatusResponse) -> Value {
    to_value(&cluster_doc(status))
}

/// Rows under a header, columns aligned, indented by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::from(" ");
        for (i, cell) in cells.iter().enumerate() {
            out.push(' ');
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let width = widths.get(i).copied().unwrap_or(0);
                out.push_str(&format!("{cell:<width$} "));
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn epoch_text(r: &proto::MutationResponse) -> String {
    r.epoch.map(|e| format!(" (epoch {e})")).unwrap_or_default()
}

/// A finished (or not) flow's result on one line.
fn result_text(name: &str, flow: &proto::Flow) -> String {
    let mut out = format!("{name} {}", flow.status);
    match flow.status.as_str() {
        "succeeded" => {
            out.push_str(&format!(": {}", flow.output_json.as_deref().unwrap_or("null")));
        }
        _ => {
            if let Some(kind) = &flow.error_kind {
                out.push_str(&format!(" ({kind})"));
            }
            if let Some(error) = &flow.error {
                out.push_str(&format!(": {error}"));
            }
        }
    }
    out.push('\n');
    out
}

fn start_text(name: &str, response: &proto::StartFlowResponse, wait: bool) -> String {
    let status = response.flow.as_ref().map_or("unknown", |f| f.status.as_str());
    let mut out = if response.created {
        format!("started {name}\n")
    } else {
        format!("{name} already exists ({status})\n")
    };
    if wait {
        if let Some(flow) = &response.flow {
            out.push_str(&result_text(name, flow));
        }
    }
    out
}

/// A flow, human readable.
fn flow_text(flow: &proto::Flow) -> String {
    let name = format!("{}/{}", flow.flow_type, flow.instance);
    let mut out = format!("{name}: {} (epoch {})\n", flow.status, flow.epoch);
    if flow.error_kind.is_some() || flow.error.is_some() {
        out.push_str(&format!(
            "error:  ({}) {}\n",
            flow.error_kind.as_deref().unwrap_or("-"),
            flow.error.as_deref().unwrap_or("")
        ));
    }
    out.push_str(&format!("input:  {}\n", flow.input_json));
    if let Some(output) = &flow.output_json {
        out.push_str(&format!("output: {output}\n"));
    }
    if let Some(parent) = &flow.parent {
        out.push_str(&format!("parent: {}/{}\n", parent.flow_type, parent.instance));
    }
    match flow.leader_node {
        Some(node) => out.push_str(&format!("leader: node {node}\n")),
        None => out.push_str("leader: unknown\n"),
    }
    out.push_str(&format!("created_ms: {}\n", flow.created_ms));
    if let Some(ms) = flow.finished_ms {
        out.push_str(&format!("finished_ms: {ms}\n"));
    }
    if let Some(ms) = flow.postponed_until_ms {
        out.push_str(&format!("postponed_until_ms: {ms}\n"));
    }
    if let Some(note) = &flow.note {
        out.push_str(&format!("note: {note}\n"));
    }
    if !flow.effects.is_empty() {
        out.push_str(&format!("effects ({}):\n", flow.effects.len()));
        let rows: Vec<Vec<String>> = flow
            .effects
            .iter()
            .map(|e| vec![e.id.clone(), e.kind.clone(), e.state.clone(), e.value_json.clone()])
            .collect();
        out.push_str(&table(&["ID", "KIND", "STATE", "VALUE"], &rows));
    }
    if !flow.events.is_empty() {
        out.push_str(&format!("events ({}):\n", flow.events.len()));
        let rows: Vec<Vec<String>> = flow
            .events
            .iter()
            .map(|e| vec![e.seq.to_string(), e.kind.clone(), e.name.clone(), e.payload_json.clone()])
            .collect();
        out.push_str(&table(&["SEQ", "KIND", "NAME", "PAYLOAD"], &rows));
    }
    if !flow.timers.is_empty() {
        out.push_str(&format!("timers ({}):\n", flow.timers.len()));
        let rows: Vec<Vec<String>> =
            flow.timers.iter().map(|t| vec![t.id.clone(), t.deadline_ms.to_string()]).collect();
        out.push_str(&table(&["ID", "DEADLINE_MS"], &rows));
    }
    if !flow.dead_letters.is_empty() {
        out.push_str(&format!("dead letters ({}):\n", flow.dead_letters.len()));
        out.push_str(&letters_table(&flow.dead_letters));
    }
    out
}

/// A page of flows, one line each.
fn list_text(page: &proto::ListFlowsResponse) -> String {
    let mut out = String::new();
    if page.flows.is_empty() {
        out.push_str("no flows\n");
    } else {
        let rows: Vec<Vec<String>> = page
            .flows
            .iter()
            .map(|f| {
                vec![
                    format!("{}/{}", f.flow_type, f.instance),
                    f.status.clone(),
                    f.epoch.to_string(),
                    f.error_kind.clone().unwrap_or_default(),
                ]
            })
            .collect();
        out.push_str(&table(&["FLOW", "STATUS", "EPOCH", "ERROR_KIND"], &rows));
    }
    if let Some(next) = &page.next {
        out.push_str(&format!("more: --cursor {next}\n"));
    }
    out
}

/// The cluster's status, human readable.
fn cluster_status_text(status: &proto::ClusterStatusResponse) -> String {
    let mut out = format!("cluster {}\nmembers:\n", status.cluster_id);
    let rows: Vec<Vec<String>> = status
        .members
        .iter()
        .map(|m| vec![m.id.to_string(), m.addr.clone(), if m.alive { "yes" } else { "no" }.to_string()])
        .collect();
    out.push_str(&table(&["ID", "ADDR", "ALIVE"], &rows));
    out.push_str("shards:\n");
    let rows: Vec<Vec<String>> = status
        .shards
        .iter()
        .map(|s| {
            let replicas: Vec<String> = s.replicas.iter().map(u64::to_string).collect();
            vec![s.id.to_string(), s.leader.map_or("-".to_string(), |l| l.to_string()), replicas.join(",")]
        })
        .collect();
    out.push_str(&table(&["SHARD", "LEADER", "REPLICAS"], &rows));
    out.push_str("leaders per node:\n");
    let leaderless = status.shards.iter().filter(|s| s.leader.is_none()).count();
    for (node, count) in &status.leaders_per_node() {
        out.push_str(&format!("  node {node}: {count}\n"));
    }
    if leaderless > 0 {
        out.push_str(&format!("  no leader: {leaderless}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};
    use serde_json::json;

    use super::*;

    /// The shape an application gives its command line (`app.rs`).
    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        addr: AddrArg,
        #[command(subcommand)]
        command: TestCommand,
    }

    #[derive(Subcommand, Debug)]
    enum TestCommand {
        /// A command of the application's own.
        Node {
            #[arg(long)]
            id: u64,
        },
        #[command(flatten)]
        Client(ClientCommand),
    }

    fn parse(args: &[&str]) -> Result<TestCli, clap::Error> {
        TestCli::try_parse_from(std::iter::once("app").chain(args.iter().copied()))
    }

    fn sample_flow() -> proto::Flow {
        proto::Flow {
            flow_type: "order".into(),
            instance: "o-1".into(),
            status: "failed".into(),
            error_kind: Some("effect_outcome_unknown".into()),
            error: Some("ship: outcome unknown".into()),
            epoch: 3,
            input_json: r#"{"order_id":"o-1"}"#.into(),
            output_json: None,
            effects: vec![
                proto::Effect {
                    id: "charge".into(),
                    kind: "effect".into(),
                    state: "completed".into(),
                    value_json: r#"{"ok":true}"#.into(),
                },
                proto::Effect {
                    id: "ship".into(),
                    kind: "at_most_once".into(),
                    state: "started".into(),
                    value_json: String::new(),
                },
            ],
            events: vec![proto::Event {
                seq: 0,
                kind: "message".into(),
                name: "Paid".into(),
                payload_json: "{}".into(),
            }],
            timers: vec![proto::Timer { id: "t".into(), deadline_ms: 5 }],
            leader_node: Some(2),
            parent: Some(proto::FlowRef { flow_type: "batch".into(), instance: "b-1".into() }),
            created_ms: 1,
            finished_ms: Some(9),
            postponed_until_ms: None,
            note: None,
            dead_letters: vec![proto::DeadLetter {
                target: Some(proto::FlowRef { flow_type: "order".into(), instance: "o-1".into() }),
                seq: 4,
                sender: Some(proto::FlowRef { flow_type: "batch".into(), instance: "b-1".into() }),
                message_type: "Paid".into(),
                payload_json: r#"{"cents":5}"#.into(),
                idempotency_key: Some("batch/b-1#pay@s1>s0:2".into()),
                reason: "finished".into(),
                target_status: Some("failed".into()),
                at_ms: 10,
            }],
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        TestCli::command().debug_assert();
    }

    #[test]
    fn flow_json_has_the_contract_fields() {
        let v = flow_json(&sample_flow());
        assert_eq!(v["type"], "order");
        assert_eq!(v["instance"], "o-1");
        assert_eq!(v["status"], "failed");
        assert_eq!(v["error_kind"], "effect_outcome_unknown");
        assert_eq!(v["error"], "ship: outcome unknown");
        assert_eq!(v["epoch"], 3);
        assert_eq!(v["input"], json!({"order_id": "o-1"}));
        assert_eq!(v["output"], Value::Null);
        assert_eq!(
            v["effects"],
            json!([
                {"id": "charge", "kind": "effect", "state": "completed", "value": {"ok": true}},
                {"id": "ship", "kind": "at_most_once", "state": "started", "value": null},
            ])
        );
        assert_eq!(v["events"], json!([{"seq": 0, "kind": "message", "name": "Paid", "payload": {}}]));
        assert_eq!(v["timers"], json!([{"id": "t", "deadline_ms": 5}]));
        assert_eq!(v["leader_node"], 2);
        assert_eq!(v["parent"], "batch/b-1");
        assert_eq!(
            v["dead_letters"],
            json!([{
                "target": "order/o-1",
                "seq": 4,
                "sender": "batch/b-1",
                "message_type": "Paid",
                "payload": {"cents": 5},
                "idempotency_key": "batch/b-1#pay@s1>s0:2",
                "reason": "finished",
                "target_status": "failed",
                "at_ms": 10,
            }])
        );
        let text = flow_text(&sample_flow());
        assert!(text.contains("dead letters (1):"), "{text}");
        assert!(text.contains("finished (failed)"), "{text}");

        let running = proto::Flow {
            flow_type: "a".into(),
            instance: "b".into(),
            status: "succeeded".into(),
            input_json: "null".into(),
            output_json: Some("[1,2]".into()),
            ..Default::default()
        };
        let v = flow_json(&running);
        assert_eq!(v["error_kind"], Value::Null);
        assert_eq!(v["error"], Value::Null);
        assert_eq!(v["output"], json!([1, 2]));
        assert_eq!(v["leader_node"], Value::Null);
        assert_eq!(v["parent"], Value::Null);
        assert_eq!(v["effects"], json!([]));
    }

    #[test]
    fn list_json_has_the_contract_shape() {
        let page = proto::ListFlowsResponse {
            flows: vec![
                proto::FlowSummary {
                    flow_type: "order".into(),
                    instance: "o-1".into(),
                    status: "running".into(),
                    error_kind: None,
                    epoch: 1,
                    created_ms: 5,
                    finished_ms: None,
                },
                proto::FlowSummary {
                    flow_type: "order".into(),
                    instance: "o-2".into(),
                    status: "failed".into(),
                    error_kind: Some("boom".into()),
                    epoch: 2,
                    created_ms: 6,
                    finished_ms: Some(7),
                },
            ],
            next: Some("c-1".into()),
        };
        assert_eq!(
            list_json(&page),
            json!({
                "flows": [
                    {"type": "order", "instance": "o-1", "status": "running", "error_kind": null, "epoch": 1},
                    {"type": "order", "instance": "o-2", "status": "failed", "error_kind": "boom", "epoch": 2},
                ],
                "next": "c-1",
            })
        );
        let empty = list_json(&proto::ListFlowsResponse::default());
        assert_eq!(empty, json!({"flows": [], "next": null}));
        let text = list_text(&page);
        assert!(
            text.contains("order/o-1") && text.contains("boom") && text.contains("--cursor c-1"),
            "{text}"
        );
    }

    fn sample_status() -> proto::ClusterStatusResponse {
        proto::ClusterStatusResponse {
            cluster_id: "c-42".into(),
            members: vec![
                proto::Member { id: 1, addr: "127.0.0.1:7001".into(), alive: true },
                proto::Member { id: 2, addr: "127.0.0.1:7002".into(), alive: false },
                proto::Member { id: 3, addr: "127.0.0.1:7003".into(), alive: true },
            ],
            shards: vec![
                proto::ShardStatus { id: 0, leader: Some(1), replicas: vec![1, 2, 3] },
                proto::ShardStatus { id: 1, leader: None, replicas: vec![1, 2, 3] },
                proto::ShardStatus { id: 2, leader: Some(1), replicas: vec![1, 2, 3] },
            ],
        }
    }

    #[test]
    fn cluster_status_json_is_exactly_the_contract() {
        assert_eq!(
            cluster_status_json(&sample_status()),
            json!({
                "cluster_id": "c-42",
                "members": [
                    {"id": 1, "addr": "127.0.0.1:7001", "alive": true},
                    {"id": 2, "addr": "127.0.0.1:7002", "alive": false},
                    {"id": 3, "addr": "127.0.0.1:7003", "alive": true},
                ],
                "shards": [
                    {"id": 0, "leader": 1, "replicas": [1, 2, 3]},
                    {"id": 1, "leader": null, "replicas": [1, 2, 3]},
                    {"id": 2, "leader": 1, "replicas": [1, 2, 3]},
                ],
            })
        );
    }

    #[test]
    fn printed_documents_keep_the_key_order() -> Result<(), CliError> {
        let status = json_line(&cluster_doc(&sample_status()))?;
        assert!(
            status.starts_with(
                r#"{"cluster_id":"c-42","members":[{"id":1,"addr":"127.0.0.1:7001","alive":true},"#
            ),
            "{status}"
        );
        assert!(status.contains(r#""shards":[{"id":0,"leader":1,"replicas":[1,2,3]},"#), "{status}");
        assert!(status.ends_with("}\n") && status.lines().count() == 1);
        let flow = json_line(&flow_doc(&sample_flow()))?;
        assert!(flow.starts_with(r#"{"type":"order","instance":"o-1","status":"failed","#), "{flow}");
        let printed: Value = serde_json::from_str(&flow).map_err(ClientError::from)?;
        assert_eq!(printed, flow_json(&sample_flow()));
        let list = json_line(&list_doc(&proto::ListFlowsResponse::default()))?;
        assert_eq!(list, "{\"flows\":[],\"next\":null}\n");
        Ok(())
    }

    #[test]
    fn cluster_status_text_counts_leaders_per_node() {
        let text = cluster_status_text(&sample_status());
        assert!(text.contains("cluster c-42"), "{text}");
        assert!(text.contains("127.0.0.1:7002  no"), "{text}");
        assert!(text.contains("  node 1: 2\n") && text.contains("  node 3: 0\n"), "{text}");
        assert!(!text.contains("node 2:"), "{text}");
        assert!(text.contains("  no leader: 1\n"), "{text}");
    }

    #[test]
    fn human_texts() {
        let flow = sample_flow();
        let text = flow_text(&flow);
        assert!(text.starts_with("order/o-1: failed (epoch 3)\n"), "{text}");
        assert!(text.contains("effect_outcome_unknown") && text.contains("parent: batch/b-1"), "{text}");
        assert!(text.contains("charge") && text.contains("Paid"), "{text}");
        let response = proto::StartFlowResponse { created: false, flow: Some(flow) };
        assert_eq!(
            start_text("order/o-1", &response, true),
            "order/o-1 already exists (failed)\norder/o-1 failed (effect_outcome_unknown): ship: outcome unknown\n"
        );
        let done =
            proto::Flow { status: "succeeded".into(), output_json: Some("7".into()), ..Default::default() };
        let response = proto::StartFlowResponse { created: true, flow: Some(done) };
        assert_eq!(start_text("a/b", &response, true), "started a/b\na/b succeeded: 7\n");
        assert_eq!(start_text("a/b", &response, false), "started a/b\n");
        assert_eq!(epoch_text(&proto::MutationResponse { epoch: Some(4) }), " (epoch 4)");
        assert_eq!(epoch_text(&proto::MutationResponse { epoch: None }), "");
    }

    #[test]
    fn json_arguments_are_checked_locally() {
        let err = check_json("input", "{nope").err();
        assert!(err.as_ref().is_some_and(|e| e.exit_code() == 1), "{err:?}");
        assert!(err.is_some_and(|e| e.to_string().starts_with("input is not valid JSON: ")));
        assert!(check_json("input", r#"{"a":[1,2]}"#).is_ok());
        assert!(check_json("value", "-1").is_ok());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        assert_eq!(CliError::Invalid("x".into()).exit_code(), 1);
        assert_eq!(CliError::Client(ClientError::NotFound("x".into())).exit_code(), 1);
        assert_eq!(
            CliError::Client(ClientError::NotFound("flow a/b not found".into())).to_string(),
            "flow a/b not found"
        );
    }

    #[test]
    fn commands_parse() -> Result<(), clap::Error> {
        let cli = parse(&[
            "--addr",
            "h:1",
            "flow",
            "start",
            "order",
            "o-1",
            "--input",
            "{}",
            "--wait",
            "--timeout",
            "5",
        ])?;
        assert_eq!(cli.addr.addr, "h:1");
        match cli.command {
            TestCommand::Client(ClientCommand::Flow(FlowCommand::Start { flow, input, wait, timeout })) => {
                assert_eq!(
                    (flow.flow_type.as_str(), flow.instance.as_str(), input.as_str()),
                    ("order", "o-1", "{}")
                );
                assert!(wait);
                assert_eq!(timeout, Some(5));
            }
            other => panic!("{other:?}"),
        }
        // The global --addr after the subcommand too.
        let cli = parse(&["flow", "get", "order", "o-1", "--json", "--addr", "h:2"])?;
        assert_eq!(cli.addr.addr, "h:2");
        assert!(matches!(
            cli.command,
            TestCommand::Client(ClientCommand::Flow(FlowCommand::Get { json: true, .. }))
        ));
        let cli = parse(&["flow", "send", "signup", "s-1", "EmailVerified", "{}", "--key", "k"])?;
        assert!(matches!(
            cli.command,
            TestCommand::Client(ClientCommand::Flow(FlowCommand::Send { key: Some(ref k), ref message_type, .. }))
                if k == "k" && message_type == "EmailVerified"
        ));
        let cli =
            parse(&["flow", "list", "--type", "order", "--status", "failed", "--limit", "3", "--json"])?;
        assert!(matches!(
            cli.command,
            TestCommand::Client(ClientCommand::Flow(FlowCommand::List { limit: Some(3), json: true, ref flow_type, .. }))
                if flow_type.as_deref() == Some("order")
        ));
        let cli =
            parse(&["flow", "restart", "order", "o-1", "--input", "{}", "--clear-effects", "--epoch", "4"])?;
        assert!(matches!(
            cli.command,
            TestCommand::Client(ClientCommand::Flow(FlowCommand::Restart {
                clear_effects: true,
                epoch: Some(4),
                ..
            }))
        ));
        parse(&["flow", "cancel", "order", "o-1"])?;
        parse(&["flow", "delete", "order", "o-1", "--epoch", "2"])?;
        parse(&["flow", "succeed", "order", "o-1", "-5"])?;
        parse(&["flow", "fail", "order", "o-1", "given up"])?;
        parse(&["flow", "effect-set", "order", "o-1", "ship", r#"{"ok":true}"#, "--epoch", "1"])?;
        parse(&["flow", "effect-remove", "order", "o-1", "ship"])?;
        parse(&["flow", "dead-letters", "--json"])?;
        let cli = parse(&["flow", "dead-letters", "order", "o-1", "--limit", "5"])?;
        assert!(matches!(
            cli.command,
            TestCommand::Client(ClientCommand::Flow(FlowCommand::DeadLetters { limit: Some(5), .. }))
        ));
        assert!(parse(&["flow", "dead-letters", "order"]).is_err(), "a type needs its instance");
        let cli = parse(&["cluster", "status", "--json"])?;
        assert!(matches!(
            cli.command,
            TestCommand::Client(ClientCommand::Cluster(ClusterCommand::Status { json: true }))
        ));
        parse(&["cluster", "remove-node", "--id", "3"])?;
        parse(&["cluster", "config", "get", "--json"])?;
        let cli = parse(&["cluster", "config", "set", "retention-secs", "3600"])?;
        assert!(matches!(
            cli.command,
            TestCommand::Client(ClientCommand::Cluster(ClusterCommand::Config(ConfigCommand::Set {
                name: ConfigName::RetentionSecs,
                value: 3600
            })))
        ));
        assert!(parse(&["cluster", "config", "set", "shard-count", "4"]).is_err());
        parse(&["node", "--id", "1"])?;
        Ok(())
    }

    #[test]
    fn add_node_has_its_own_addr_and_keeps_the_global_one() -> Result<(), clap::Error> {
        let cli = parse(&["--addr", "h:1", "cluster", "add-node", "--id", "4", "--addr", "h:4"])?;
        assert_eq!(cli.addr.addr, "h:1");
        match cli.command {
            TestCommand::Client(ClientCommand::Cluster(ClusterCommand::AddNode {
                id, node_addr, ..
            })) => {
                assert_eq!((id, node_addr.as_str()), (4, "h:4"));
            }
            other => panic!("{other:?}"),
        }
        let cli = parse(&["cluster", "add-node", "--addr", "h:4", "--id", "4"])?;
        assert_ne!(cli.addr.addr, "h:4");
        Ok(())
    }

    #[test]
    fn usage_errors() {
        for args in [
            &["flow", "frobnicate"][..],
            &["flow", "cancel", "order", "o-1", "--epoch", "abc"],
            &["flow", "start", "order", "o-1"],
            &["flow", "start", "order", "o-1", "--input", "{}", "--timeout", "3"],
            &["cluster", "add-node", "--id", "4"],
        ] {
            let err = parse(args).err();
            assert!(err.is_some_and(|e| e.use_stderr() && e.exit_code() == 2), "{args:?}");
        }
    }

    #[tokio::test]
    async fn a_bad_address_is_a_usage_error() {
        let command = ClientCommand::Cluster(ClusterCommand::Status { json: true });
        let err = run_client(command, " , ").await.err();
        assert!(err.is_some_and(|e| e.exit_code() == 2));
    }
}
