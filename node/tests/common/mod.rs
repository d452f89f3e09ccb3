//! What the in-process cluster tests of this crate share.

/// `n` free loopback ports ([`fetter::local::free_base_port`]).
pub(crate) fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let base = fetter::local::free_base_port(u16::try_from(n)?)?;
    Ok((base..base + n as u16).collect())
}
