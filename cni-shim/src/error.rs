//! CNI error codes and the spec's error JSON.

use serde_json::{json, Value};

/// Codes from the CNI specification's "Error" section plus twill's plugin-specific ones (>= 100).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// subnet.env exists but is unusable (malformed or missing keys).
    pub const SUBNET_ENV_INVALID: u32 = 100;
    /// The delegate plugin could not be found, run, or failed without a CNI error of its own.
    pub const DELEGATE_FAILED: u32 = 101;
}

/// A CNI error as printed on stdout: `{"cniVersion","code","msg","details"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The error JSON for the given spec version.
    pub fn to_json(&self, cni_version: &str) -> String {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
        .to_string()
    }

    /// Parse a plugin's error output (what a delegate printed on stdout before exiting non-zero).
    pub fn from_plugin_output(stdout: &[u8]) -> Option<CniError> {
        let v: Value = serde_json::from_slice(stdout).ok()?;
        let code = v.get("code")?.as_u64()?;
        Some(CniError {
            code: u32::try_from(code).ok()?,
            msg: v
                .get("msg")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            details: v
                .get("details")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        })
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.msg)?;
        if !self.details.is_empty() {
            write!(f, "; {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_and_round_trip() {
        let e = CniError::new(code::INVALID_ENV, "bad").with_details("x");
        let s = e.to_json("1.1.0");
        assert_eq!(
            s,
            r#"{"cniVersion":"1.1.0","code":4,"msg":"bad","details":"x"}"#
        );
        assert_eq!(CniError::from_plugin_output(s.as_bytes()), Some(e));
        assert_eq!(CniError::from_plugin_output(b"not json"), None);
        assert_eq!(CniError::from_plugin_output(br#"{"msg":"no code"}"#), None);
    }
}
