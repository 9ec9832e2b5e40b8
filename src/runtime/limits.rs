//! A tool's resource limits (`limits = { memory = "256MiB", cpus = 0.5, pids = 128 }`), which
//! every runtime enforces: the Docker runtime through the container's HostConfig, the process
//! runtime through cgroup controllers ([`super::cgroup_limits`]). The registry validates them
//! and the launch carries them to the runtime.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::ToSchema;

/// The least memory a limit may give: Docker refuses less than 6 MiB, and no MCP server
/// starts in less.
pub const MIN_MEMORY: u64 = 6 * MIB;
/// The most CPUs a limit may give (a typo such as `cpus = 50000` is refused, not obeyed).
pub const MAX_CPUS: f64 = 1024.0;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// An amount of memory in bytes, written `"256MiB"` (units `KiB`, `MiB`, `GiB`; a plain
/// number is bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

impl Bytes {
    /// `"256MiB"`, `"1 GiB"`, `"1048576"`: the bytes, or why it is not an amount.
    pub fn parse(text: &str) -> Result<Bytes, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let unit = unit.trim();
        let scale = match unit {
            "" | "B" => 1,
            "KiB" => KIB,
            "MiB" => MIB,
            "GiB" => GIB,
            _ => {
                return Err(format!(
                    "'{text}' is not an amount of memory: give a whole number with the unit \
                     KiB, MiB or GiB (such as \"256MiB\"), or plain bytes"
                ));
            }
        };
        let n: u64 = number.parse().map_err(|_| {
            format!("'{text}' is not an amount of memory: it must start with a whole number")
        })?;
        n.checked_mul(scale)
            .map(Bytes)
            .ok_or_else(|| format!("'{text}' is more memory than any host has"))
    }
}

/// The largest unit that divides the amount exactly: `256 MiB`, `1536 KiB`, `1000 B`.
impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        match [(GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")]
            .into_iter()
            .find(|(scale, _)| n > 0 && n.is_multiple_of(*scale))
        {
            Some((scale, unit)) => write!(f, "{} {unit}", n / scale),
            None => write!(f, "{n} B"),
        }
    }
}

/// Written back as the user would write it: `"256MiB"`.
impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string().replace(' ', ""))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "memory: give an amount such as \"256MiB\" (KiB, MiB, GiB) or a number of bytes",
            )
        })? {
            Raw::Number(n) => Ok(Bytes(n)),
            Raw::Text(t) => Bytes::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// The resources a deployment may use; each absent one is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory (`"256MiB"`; units KiB, MiB, GiB, or a number of bytes), swap included: a
    /// server that needs more is killed (out of memory) and restarted per its policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "256MiB")]
    pub memory: Option<Bytes>,
    /// CPU time, in CPUs (`0.5`: half of one CPU's time), over all the server's threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Processes and threads the server may have at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

impl Limits {
    pub fn is_none(&self) -> bool {
        *self == Limits::default()
    }

    /// Why these limits cannot be obeyed, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if let Some(m) = self.memory
            && m.0 < MIN_MEMORY
        {
            return Err(format!(
                "memory: {m} is too little for any server: give at least {}",
                Bytes(MIN_MEMORY)
            ));
        }
        if let Some(c) = self.cpus
            && !(c.is_finite() && c > 0.0 && c <= MAX_CPUS)
        {
            return Err(format!(
                "cpus: {c} is not a share of CPU time: give a number above 0 and at most \
                 {MAX_CPUS} (0.5 is half of one CPU)"
            ));
        }
        if self.pids == Some(0) {
            return Err("pids: 0 would let the server run nothing: give at least 1".into());
        }
        Ok(())
    }

    /// The CPU limit in billionths of a CPU (Docker's `NanoCpus`).
    pub fn nano_cpus(&self) -> Option<i64> {
        self.cpus.map(|c| (c * 1e9).round() as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_read_with_binary_units_or_as_bytes() {
        assert_eq!(Bytes::parse("256MiB"), Ok(Bytes(256 * MIB)));
        assert_eq!(Bytes::parse("1 GiB"), Ok(Bytes(GIB)));
        assert_eq!(Bytes::parse("512KiB"), Ok(Bytes(512 * KIB)));
        assert_eq!(Bytes::parse("1048576"), Ok(Bytes(MIB)));
        for bad in [
            "256MB",
            "256 mb",
            "MiB",
            "-1MiB",
            "1.5GiB",
            "",
            "99999999999999GiB",
        ] {
            assert!(Bytes::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn memory_is_shown_in_the_largest_exact_unit_and_written_back_as_given() {
        assert_eq!(Bytes(256 * MIB).to_string(), "256 MiB");
        assert_eq!(Bytes(1536 * KIB).to_string(), "1536 KiB");
        assert_eq!(Bytes(1000).to_string(), "1000 B");
        let l: Limits = serde_json::from_value(serde_json::json!({"memory": "2GiB"})).unwrap();
        assert_eq!(serde_json::to_value(l).unwrap()["memory"], "2GiB");
        let n: Limits = serde_json::from_value(serde_json::json!({"memory": 8388608})).unwrap();
        assert_eq!(n.memory, Some(Bytes(8 * MIB)));
    }

    #[test]
    fn limits_that_cannot_be_obeyed_are_refused_naming_the_field() {
        let too_little = Limits {
            memory: Some(Bytes(MIB)),
            ..Limits::default()
        };
        assert!(too_little.check().unwrap_err().starts_with("memory:"));
        for cpus in [0.0, -1.0, f64::NAN, 5000.0] {
            let l = Limits {
                cpus: Some(cpus),
                ..Limits::default()
            };
            assert!(l.check().unwrap_err().starts_with("cpus:"), "{cpus}");
        }
        let no_pids = Limits {
            pids: Some(0),
            ..Limits::default()
        };
        assert!(no_pids.check().unwrap_err().starts_with("pids:"));
        let fine = Limits {
            memory: Some(Bytes(256 * MIB)),
            cpus: Some(0.5),
            pids: Some(128),
        };
        assert_eq!(fine.check(), Ok(()));
        assert_eq!(fine.nano_cpus(), Some(500_000_000));
    }
}
