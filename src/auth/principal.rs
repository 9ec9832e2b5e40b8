//! Who is calling and what it may call: a [`Principal`] and its [`Grants`].
//!
//! A client key and an OAuth access token both produce one (a token's scopes `mcp:{slug}`,
//! `mcp:{slug}/{tool}` and `mcp:*` parse with [`Grant::from_scope`] into the same grants as a
//! key's), so everything after authentication is written once for both.

use std::{fmt, str::FromStr};

use crate::{mcp::is_valid_tool_name, registry::is_valid_slug};

/// How a principal proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    /// A client key made with `POST /api/v1/keys`; the principal's id is the key's id.
    Key,
    /// An OAuth access token (a JWT from `[auth.oauth] issuer`); the principal's id is the
    /// token's subject.
    OAuth,
}

/// An authenticated caller of `/mcp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's id, or the token's subject: what logs and records name, never a secret.
    pub id: String,
    pub kind: PrincipalKind,
    pub grants: Grants,
}

/// One thing a principal may call.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Grant {
    /// `*`: every tool.
    All,
    /// `slug`: every MCP tool of one Switchboard tool.
    Tool(String),
    /// `slug/name`: one MCP tool of one Switchboard tool.
    McpTool { slug: String, name: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{0}' is not a grant: use '*' (every tool), a tool slug ('everything') or a slug and one of \
     its MCP tools ('everything/echo')"
)]
pub struct BadGrant(pub String);

impl FromStr for Grant {
    type Err = BadGrant;
    fn from_str(s: &str) -> Result<Grant, BadGrant> {
        let bad = || BadGrant(s.to_owned());
        if s == "*" {
            return Ok(Grant::All);
        }
        match s.split_once('/') {
            None if is_valid_slug(s) => Ok(Grant::Tool(s.to_owned())),
            Some((slug, name)) if is_valid_slug(slug) && is_valid_tool_name(name) => {
                Ok(Grant::McpTool {
                    slug: slug.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(bad()),
        }
    }
}

impl Grant {
    /// The grant an OAuth scope carries (`mcp:*`, `mcp:{slug}`, `mcp:{slug}/{tool}`); `None`
    /// for scopes that are not Switchboard's.
    pub fn from_scope(scope: &str) -> Option<Grant> {
        scope.strip_prefix("mcp:")?.parse().ok()
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Grant::All => f.write_str("*"),
            Grant::Tool(slug) => f.write_str(slug),
            Grant::McpTool { slug, name } => write!(f, "{slug}/{name}"),
        }
    }
}

/// What a principal may do on one Switchboard tool.
#[derive(Debug, PartialEq, Eq)]
pub enum Access<'a> {
    /// Every MCP tool of it.
    Whole,
    /// Only these MCP tools of it.
    Only(Vec<&'a str>),
    /// Nothing.
    None,
}

/// A principal's grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants(Vec<Grant>);

impl Grants {
    pub fn new(grants: Vec<Grant>) -> Grants {
        Grants(grants)
    }

    /// Parses every grant, naming the first that is not one.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Grants, BadGrant> {
        items
            .iter()
            .map(|s| s.as_ref().parse())
            .collect::<Result<_, _>>()
            .map(Grants)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Grant> {
        self.0.iter()
    }

    pub fn access(&self, slug: &str) -> Access<'_> {
        let mut only = Vec::new();
        for g in &self.0 {
            match g {
                Grant::All => return Access::Whole,
                Grant::Tool(s) if s == slug => return Access::Whole,
                Grant::McpTool { slug: s, name } if s == slug => only.push(name.as_str()),
                _ => {}
            }
        }
        if only.is_empty() {
            Access::None
        } else {
            Access::Only(only)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_parse_into_their_three_forms() {
        assert_eq!("*".parse(), Ok(Grant::All));
        assert_eq!("everything".parse(), Ok(Grant::Tool("everything".into())));
        assert_eq!(
            "everything/get-sum".parse(),
            Ok(Grant::McpTool {
                slug: "everything".into(),
                name: "get-sum".into()
            })
        );
        for bad in [
            "",
            "Everything",
            "a/",
            "/echo",
            "a/b/c",
            "a b",
            "**",
            "a/ec ho",
        ] {
            assert!(bad.parse::<Grant>().is_err(), "{bad:?}");
        }
        for s in ["*", "demo", "demo/echo"] {
            assert_eq!(s.parse::<Grant>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn scopes_carry_the_same_grants() {
        assert_eq!(Grant::from_scope("mcp:*"), Some(Grant::All));
        assert_eq!(
            Grant::from_scope("mcp:demo/echo"),
            Some("demo/echo".parse().unwrap())
        );
        assert_eq!(Grant::from_scope("openid"), None);
        assert_eq!(Grant::from_scope("mcp:"), None);
    }

    #[test]
    fn access_is_whole_only_or_none() {
        let g = Grants::parse(&["a", "b/echo", "b/add"]).unwrap();
        assert_eq!(g.access("a"), Access::Whole);
        assert_eq!(g.access("b"), Access::Only(vec!["echo", "add"]));
        assert_eq!(g.access("c"), Access::None);
        assert_eq!(Grants::parse(&["*"]).unwrap().access("c"), Access::Whole);
        assert_eq!(
            Grants::parse(&["a", "nope/"]),
            Err(BadGrant("nope/".into()))
        );
    }
}
