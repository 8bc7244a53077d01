//! nft identifiers and quoted strings: object names that fit nft's limits whatever a
//! manifest holds ([`ident`]), and escaped, bounded comments and log prefixes ([`quoted`]).

use std::fmt::Write as _;

/// Longest name of an nft object (chain, set, counter): the kernel's NFT_NAME_MAXLEN is 256
/// bytes with the terminating NUL.
pub const NAME_MAX: usize = 255;
/// Longest comment nft accepts (NFTNL_UDATA_COMMENT_MAXLEN), in bytes: "comment too long,
/// 128 characters maximum allowed".
pub const COMMENT_MAX: usize = 128;
/// Longest log prefix (the kernel's NF_LOG_PREFIXLEN is 128 bytes with the NUL).
pub const LOG_PREFIX_MAX: usize = 127;

/// Hex digits of the SHA-256 prefix in a hashed name (128 bits: no tenant can make two of
/// its names collide, which would break the whole table).
const HASH_HEX: usize = 32;

/// Whether `s` may stand as one `/`-separated part of an nft identifier as it is: nft's
/// unquoted names are a letter then letters, digits, `/ - _ .` (every Kubernetes name is
/// made of these; `/` is our separator, so not inside a part).
pub(super) fn plain_part(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The nft name `<kind>/<objs joined by '/'>[/<tail>]` of the object that belongs to the
/// Kubernetes objects named `objs` (namespace, pod or policy), e.g. `pod-in/x/web` or
/// `peers/x/allow-web/in0/v4`. `kind` and `tail` are ours (a letter first, nft's
/// characters only).
///
/// Unchanged when every part is plain and the whole fits in [`NAME_MAX`] - 1 bytes. Otherwise
/// (a 253-character pod name in a 63-character namespace is 325 bytes; a manifest may hold
/// any UTF-8) the name is a readable head (the same text, other characters as `_`, cut or
/// padded with `_` to a fixed width) then `/<tail>`, `-` and 128 bits of SHA-256 over the
/// length-prefixed parts: exactly [`NAME_MAX`] bytes, so never equal to an unchanged name,
/// stable across syncs, and distinct for distinct objects.
pub(super) fn ident(kind: &str, objs: &[&str], tail: &str) -> String {
    let tail_len = if tail.is_empty() { 0 } else { tail.len() + 1 };
    let len = kind.len() + objs.iter().map(|o| o.len() + 1).sum::<usize>() + tail_len;
    if len < NAME_MAX && objs.iter().all(|o| plain_part(o)) {
        let mut s = String::with_capacity(len);
        s.push_str(kind);
        for o in objs {
            s.push('/');
            s.push_str(o);
        }
        if !tail.is_empty() {
            s.push('/');
            s.push_str(tail);
        }
        return s;
    }
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in std::iter::once(&kind).chain(objs).chain([&tail]) {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let head_len = NAME_MAX - 1 - HASH_HEX - tail_len;
    let mut s = String::with_capacity(NAME_MAX);
    s.push_str(kind);
    for o in objs {
        if s.len() >= head_len {
            break;
        }
        s.push('/');
        s.extend(o.chars().map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        }));
    }
    // ASCII only, so any byte index is a char boundary.
    s.truncate(head_len);
    while s.len() < head_len {
        s.push('_');
    }
    if !tail.is_empty() {
        s.push('/');
        s.push_str(tail);
    }
    s.push('-');
    for b in &digest[..HASH_HEX / 2] {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `s` as an nft quoted string (with its quotes) of at most `max` bytes inside them, for
/// comments and log prefixes, whatever UTF-8 a manifest holds. nft's quoted strings have no
/// escapes (a `"` ends them) and a log prefix expands `$name` as a variable, so everything but
/// printable ASCII, and `"`, `\` and `$`, is written `\u{hex}` (ASCII, no quote, no dollar;
/// control characters cannot forge log lines). Too long, the middle is cut (on an escape's
/// boundary) and replaced by `..`: the start (direction, namespace) and the end (rule index,
/// the end of the name) stay readable. Plain text renders as `{:?}` does.
pub fn quoted(s: &str, max: usize) -> String {
    if s.len() <= max
        && s.bytes()
            .all(|b| (b' '..=b'~').contains(&b) && !matches!(b, b'"' | b'\\' | b'$'))
    {
        return format!("\"{s}\"");
    }
    let unit = |c: char| -> String {
        match c {
            ' '..='~' if !matches!(c, '"' | '\\' | '$') => c.to_string(),
            _ => format!("\\u{{{:x}}}", c as u32),
        }
    };
    let units: Vec<String> = s.chars().map(unit).collect();
    let total: usize = units.iter().map(String::len).sum();
    let mut out = String::with_capacity(total.min(max) + 2);
    out.push('"');
    if total <= max {
        units.iter().for_each(|u| out.push_str(u));
    } else {
        let budget = max.saturating_sub(2);
        let tail_budget = budget / 4;
        let mut tail = Vec::new();
        let mut tail_len = 0;
        for u in units.iter().rev() {
            if tail_len + u.len() > tail_budget {
                break;
            }
            tail_len += u.len();
            tail.push(u.as_str());
        }
        let mut head_len = 0;
        for u in &units[..units.len() - tail.len()] {
            if head_len + u.len() > budget - tail_len {
                break;
            }
            head_len += u.len();
            out.push_str(u);
        }
        out.push_str("..");
        tail.iter().rev().for_each(|u| out.push_str(u));
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn idents_of_long_or_odd_names_are_bounded_distinct_and_stable() {
        // Plain names are kept as they are.
        assert_eq!(
            ident("pod-in", &["x", "web-1.a_b"], ""),
            "pod-in/x/web-1.a_b"
        );
        assert_eq!(ident("peers", &["x", "p"], "in0/v4"), "peers/x/p/in0/v4");
        let long = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        let ns = "n".repeat(63);
        let names = [
            ident("pod-in", &[&ns, &long], ""),
            ident("pod-out", &[&ns, &long], ""),
            ident("pod-in", &[&ns, &format!("{long}c")], ""),
            ident("pod-in", &["a/b", "c"], ""),
            ident("pod-in", &["a", "b/c"], ""),
            ident("pod-in", &["x", "é\"$ \n"], ""),
            ident("pod-in", &["x", "_\u{301}"], ""),
            ident("peers", &[&ns, &long], "in12/v6"),
            ident("pod-in", &["x", ""], ""),
        ];
        for n in &names {
            assert_eq!(n.len(), NAME_MAX, "{n}");
            assert!(n.starts_with(|c: char| c.is_ascii_alphabetic()), "{n}");
            assert!(
                n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b)),
                "{n}"
            );
        }
        let distinct: HashSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), names.len());
        // Readable: the namespace and the start of the name, and the tail.
        assert!(names[0].starts_with(&format!("pod-in/{ns}/aaaa")));
        assert!(names[7].contains("/in12/v6-"));
        // Stable across calls (and so across syncs).
        assert_eq!(ident("pod-in", &[&ns, &long], ""), names[0]);
        // The longest plain name is kept; one byte more is hashed.
        let fit = "a".repeat(NAME_MAX - 1 - "pod-in/x/".len());
        assert_eq!(ident("pod-in", &["x", &fit], "").len(), NAME_MAX - 1);
        assert_eq!(
            ident("pod-in", &["x", &format!("{fit}a")], "").len(),
            NAME_MAX
        );
    }

    #[test]
    fn quoted_strings_are_escaped_bounded_and_cut_on_char_boundaries() {
        for s in [
            "x/allow-web ingress[0]",
            "twill-policy drop ingress x/a: ",
            "",
        ] {
            assert_eq!(quoted(s, COMMENT_MAX), format!("{s:?}"));
        }
        assert_eq!(
            quoted("a\"b\\c$d\né", COMMENT_MAX),
            "\"a\\u{22}b\\u{5c}c\\u{24}d\\u{a}\\u{e9}\""
        );
        // At the limit: kept; one more: the middle is cut, the end kept.
        let at = format!("x/{} ingress[7]", "p".repeat(COMMENT_MAX - 13));
        assert_eq!(at.len(), COMMENT_MAX);
        assert_eq!(quoted(&at, COMMENT_MAX), format!("{at:?}"));
        let over = format!("x/{} ingress[7]", "p".repeat(300));
        let q = quoted(&over, COMMENT_MAX);
        assert!(q.len() <= COMMENT_MAX + 2, "{q}");
        assert!(
            q.starts_with("\"x/ppp") && q.ends_with("pp ingress[7]\""),
            "{q}"
        );
        assert!(q.contains(".."));
        // Non-ASCII and escapes of every width: never more than max, never a cut escape.
        for c in ['é', '☃', '😀', '"', '\u{0}'] {
            for n in 0..200 {
                let s: String = std::iter::repeat_n(c, n).collect();
                for max in [LOG_PREFIX_MAX, COMMENT_MAX, 10, 3] {
                    let q = quoted(&s, max);
                    let inner = &q[1..q.len() - 1];
                    assert!(inner.len() <= max, "{c:?} x{n} max {max}: {q}");
                    assert!(inner.is_ascii() && !inner.contains(['"', '$']), "{q}");
                    let unit = format!("\\u{{{:x}}}", c as u32);
                    assert!(
                        inner.split("..").all(|part| part.len() % unit.len() == 0),
                        "{q}"
                    );
                }
            }
        }
    }
}
