//! The flows a node can run, by type name, behind a type-erased interface (JSON in, JSON out).

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::ctx::Ctx;
use crate::flow::{kind, Flow, FlowError};

/// A flow seen without its types: JSON input in, JSON output out.
pub(crate) trait ErasedFlow: Send + Sync {
    fn run(&self, ctx: Ctx, input: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, FlowError>>;
}

impl<F: Flow> ErasedFlow for F {
    fn run(&self, ctx: Ctx, input: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, FlowError>> {
        Box::pin(async move {
            let input: F::Input = serde_json::from_slice(&input)
                .map_err(|e| FlowError::new(kind::BAD_INPUT, format!("input of {}: {e}", F::TYPE)))?;
            let output = Flow::run(self, &ctx, input).await?;
            serde_json::to_vec(&output).map_err(|e| FlowError::new(kind::BAD_OUTPUT, e.to_string()))
        })
    }
}

/// Why a flow could not be registered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    /// Two flows claim the same type name.
    #[error("flow type {0:?} is registered twice")]
    Duplicate(String),
}

/// The flows of a node, by [`Flow::TYPE`]. Cheap to clone once built.
#[derive(Clone, Default)]
pub struct Registry {
    flows: HashMap<&'static str, Arc<dyn ErasedFlow>>,
}

impl Registry {
    /// No flows yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `flow` under `F::TYPE`.
    pub fn register<F: Flow>(mut self, flow: F) -> Result<Self, RegistryError> {
        if self.flows.contains_key(F::TYPE) {
            return Err(RegistryError::Duplicate(F::TYPE.to_string()));
        }
        self.flows.insert(F::TYPE, Arc::new(flow));
        Ok(self)
    }

    /// Whether a flow type is registered.
    pub fn contains(&self, flow_type: &str) -> bool {
        self.flows.contains_key(flow_type)
    }

    /// The registered flow types, sorted.
    pub fn types(&self) -> Vec<&'static str> {
        let mut types: Vec<&'static str> = self.flows.keys().copied().collect();
        types.sort_unstable();
        types
    }

    pub(crate) fn get(&self, flow_type: &str) -> Option<Arc<dyn ErasedFlow>> {
        self.flows.get(flow_type).cloned()
    }
}
