//! Names of twill's nftables tables that more than one program needs: the writer and
//! `twilld --cleanup`, which removes them without depending on the writer.

/// The CNI plugin's per-pod anti-spoofing table (family `bridge`).
pub const ANTISPOOF: &str = "twill-antispoof";
