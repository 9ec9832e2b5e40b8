//! Who may call which tool on `/mcp`: client keys ([`keys`]), OAuth access tokens from one
//! authorization server ([`oauth`]), the principal they identify and its grants ([`principal`]), quotas per principal ([`quota`]), the check the proxy runs on
//! every request ([`gate`]), and the Protected Resource Metadata a 401 points at
//! ([`metadata`]).
//!
//! The management API's token (`api_token`) is a different credential and is not accepted on
//! `/mcp`: an MCP client needs no power to start processes, and a key can be revoked without
//! touching the operator's token.

pub mod gate;
pub mod keys;
pub mod metadata;
pub mod oauth;
pub mod principal;
pub mod quota;

use serde::Deserialize;

pub use self::{
    gate::{Admission, AuthError, Gate, Refusal},
    keys::Keys,
    principal::{Grant, Grants, Principal, PrincipalKind},
};

/// `[auth] mcp`: whether `/mcp` requires a client key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum McpAuth {
    Required,
    Off,
}
