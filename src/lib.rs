//! Switchboard: an MCP server manager. See ARCHITECTURE.md for the code map.

pub mod api;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod deployment;
pub mod events;
pub mod health;
pub mod http_error;
pub mod log_retention;
pub mod manager;
pub mod mcp;
pub mod metrics;
pub mod packages;
pub mod ports;
pub mod proxy;
pub mod registry;
pub mod restart;
pub mod runtime;
pub mod secrets;
pub mod server;
pub mod signal;
pub mod stdio;
pub mod store;
pub mod top;
