//! Where a rest-hook may call: the endpoint URL policy that keeps a tenant from making the server
//! call internal services (server-side request forgery).
//!
//! The URL is parsed with the WHATWG parser of the `url` crate — the one HTTP clients such as
//! `reqwest` use — so the host checked here is exactly the host the client connects to (`0x7f.1`,
//! `2130706433` and `[::ffff:127.0.0.1]` are all `127.0.0.1` to both). The checks:
//!
//! - scheme `https`; `http` only when the policy allows insecure http or the host is on the
//!   allow-list. No user info (`https://a@b` is a classic confusion), no fragment (never sent).
//! - an IP literal host must be globally routable: loopback, private, carrier-grade NAT,
//!   link-local, unique-local, site-local, unspecified, multicast, broadcast, documentation,
//!   benchmarking and reserved ranges are refused unless an allow-list IP or CIDR covers them.
//!   IPv4-mapped IPv6 addresses are judged as their IPv4 address; NAT64 (`64:ff9b::/96`) and 6to4
//!   (`2002::/16`) as the IPv4 address they embed; IPv6 outside global unicast (`2000::/3`) is refused.
//! - `localhost` and `*.localhost` are refused unless allow-listed.
//! - any other host name is accepted here and checked again by the caller after DNS resolution,
//!   with [`EndpointPolicy::check_resolved`], on the addresses it is about to connect to (and
//!   then connects to those addresses, not to a second resolution — see `design.md`).
//!
//! The allow-list holds host names (exact, case-insensitive), IP addresses and CIDRs. An
//! allow-listed host name is trusted whatever it resolves to.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::{Host, Url};

use crate::clip;

/// Which endpoints a subscription may use. The default is the strict policy: public `https`
/// endpoints only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    allow_insecure_http: bool,
    allowed_hosts: Vec<String>,
    allowed_nets: Vec<Cidr>,
}

/// An allow-list entry that is neither a host name, an IP address nor a CIDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidAllowEntry(pub String);

impl fmt::Display for InvalidAllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid endpoint allow-list entry '{}': expected a host name, an IP address or a CIDR", self.0)
    }
}

impl std::error::Error for InvalidAllowEntry {}

/// Why an endpoint is refused. The messages are lowercase and name the offending part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointRefused {
    /// Not an absolute URL.
    Malformed(String),
    /// A scheme other than `http` / `https`.
    Scheme(String),
    /// `http` without the policy's permission.
    InsecureHttp,
    /// User name or password in the URL.
    Credentials,
    /// A `#fragment`.
    Fragment,
    /// An address outside the public internet, not allow-listed.
    Address { address: IpAddr, class: &'static str },
    /// `localhost` or a `.localhost` name, not allow-listed.
    LocalName(String),
    /// Name resolution produced no address.
    NoAddress,
}

impl fmt::Display for EndpointRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointRefused::Malformed(reason) => write!(f, "not an absolute URL: {reason}"),
            EndpointRefused::Scheme(scheme) => write!(f, "scheme '{scheme}' is not supported: use https"),
            EndpointRefused::InsecureHttp => f.write_str("http endpoints are not allowed by this server: use https"),
            EndpointRefused::Credentials => {
                f.write_str("the URL must not contain a user name or password: use channel.header for credentials")
            }
            EndpointRefused::Fragment => f.write_str("the URL must not contain a fragment ('#')"),
            EndpointRefused::Address { address, class } => {
                write!(f, "address {address} is {class} and not allowed by this server")
            }
            EndpointRefused::LocalName(host) => write!(f, "host '{host}' is local and not allowed by this server"),
            EndpointRefused::NoAddress => f.write_str("the host name resolved to no address"),
        }
    }
}

impl std::error::Error for EndpointRefused {}

/// An endpoint that passed [`EndpointPolicy::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    url: Url,
}

impl Endpoint {
    /// The URL in its normalized (WHATWG serialized) form: what the client must call.
    pub fn as_str(&self) -> &str {
        self.url.as_str()
    }

    /// The parsed URL.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The host as serialized in the URL (a name, an IPv4 address, or `[v6]`).
    pub fn host(&self) -> &str {
        self.url.host_str().unwrap_or_default()
    }

    /// The host's IP address when the host is an IP literal.
    pub fn ip(&self) -> Option<IpAddr> {
        match self.url.host()? {
            Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
            Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
            Host::Domain(_) => None,
        }
    }

    /// True when the host is a name: the caller resolves it and checks the addresses with
    /// [`EndpointPolicy::check_resolved`] before connecting.
    pub fn needs_resolution(&self) -> bool {
        matches!(self.url.host(), Some(Host::Domain(_)))
    }

    /// The port, explicit or the scheme's default.
    pub fn port(&self) -> u16 {
        self.url.port_or_known_default().unwrap_or(443)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.url.as_str())
    }
}

impl EndpointPolicy {
    /// Public `https` endpoints only (the default).
    pub fn strict() -> EndpointPolicy {
        EndpointPolicy::default()
    }

    /// A policy with an allow-list of host names, IP addresses and CIDRs (`10.0.0.0/8`,
    /// `fd00::/8`), and whether `http` is allowed for any (public) host.
    pub fn new<S: AsRef<str>>(allow: &[S], allow_insecure_http: bool) -> Result<EndpointPolicy, InvalidAllowEntry> {
        let mut policy = EndpointPolicy { allow_insecure_http, ..EndpointPolicy::default() };
        for entry in allow {
            let entry = entry.as_ref().trim();
            if let Some(cidr) = Cidr::parse(entry) {
                policy.allowed_nets.push(cidr);
            } else if let Some(host) = normalize_host_name(entry) {
                policy.allowed_hosts.push(host);
            } else {
                return Err(InvalidAllowEntry(entry.to_owned()));
            }
        }
        Ok(policy)
    }

    /// Whether `http` is allowed for any public host.
    pub fn allows_insecure_http(&self) -> bool {
        self.allow_insecure_http
    }

    /// Checks an endpoint URL (a subscription's, or a redirect target's).
    pub fn check(&self, endpoint: &str) -> Result<Endpoint, EndpointRefused> {
        if let Some(c) = endpoint.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(EndpointRefused::Malformed(format!("contains the character {c:?}")));
        }
        let url = Url::parse(endpoint).map_err(|e| EndpointRefused::Malformed(e.to_string()))?;
        let scheme = url.scheme();
        if scheme != "https" && scheme != "http" {
            return Err(EndpointRefused::Scheme(clip(scheme)));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(EndpointRefused::Credentials);
        }
        if url.fragment().is_some() {
            return Err(EndpointRefused::Fragment);
        }
        let allow_listed = match url.host() {
            Some(Host::Domain(name)) => {
                let name = name.trim_end_matches('.');
                let listed = self.host_listed(name);
                if !listed && (name == "localhost" || name.ends_with(".localhost")) {
                    return Err(EndpointRefused::LocalName(clip(name)));
                }
                listed
            }
            Some(Host::Ipv4(v4)) => self.check_ip(IpAddr::V4(v4))?,
            Some(Host::Ipv6(v6)) => self.check_ip(IpAddr::V6(v6))?,
            None => return Err(EndpointRefused::Malformed("no host".to_owned())),
        };
        if scheme == "http" && !self.allow_insecure_http && !allow_listed {
            return Err(EndpointRefused::InsecureHttp);
        }
        Ok(Endpoint { url })
    }

    /// Checks the addresses a host name of `endpoint` resolved to, before connecting: every one
    /// must be public or allow-listed (one private answer is enough to refuse — the client might
    /// pick it), unless the host name itself is allow-listed. For an IP literal endpoint this
    /// re-checks the literal.
    pub fn check_resolved(&self, endpoint: &Endpoint, addresses: &[IpAddr]) -> Result<(), EndpointRefused> {
        if let Some(ip) = endpoint.ip() {
            return self.check_ip(ip).map(|_| ());
        }
        if self.host_listed(endpoint.host().trim_end_matches('.')) {
            return Ok(());
        }
        if addresses.is_empty() {
            return Err(EndpointRefused::NoAddress);
        }
        for address in addresses {
            self.check_ip(*address)?;
        }
        Ok(())
    }

    fn host_listed(&self, name: &str) -> bool {
        self.allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(name))
    }

    /// `Ok(true)` when the address is allow-listed, `Ok(false)` when it is public.
    fn check_ip(&self, address: IpAddr) -> Result<bool, EndpointRefused> {
        let canonical = address.to_canonical();
        if self.allowed_nets.iter().any(|net| net.contains(canonical)) {
            return Ok(true);
        }
        match special_class(canonical) {
            Some(class) => Err(EndpointRefused::Address { address: canonical, class }),
            None => Ok(false),
        }
    }
}

/// A host name as the URL parser normalizes it (lowercase, IDNA), without a trailing dot;
/// `None` when it is not a valid host name.
fn normalize_host_name(name: &str) -> Option<String> {
    if name.is_empty() || name.contains(['/', ':', '@', '?', '#', '[', ']']) {
        return None;
    }
    let url = Url::parse(&format!("https://{name}/")).ok()?;
    match url.host()? {
        Host::Domain(domain) => Some(domain.trim_end_matches('.').to_owned()),
        _ => None,
    }
}

/// An IP network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    address: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `a.b.c.d`, `a.b.c.d/n`, `v6`, `v6/n` (host bits must be zero).
    fn parse(text: &str) -> Option<Cidr> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address.parse().ok()?;
        let address = address.to_canonical();
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse::<u8>().ok()?,
            Some(_) => return None,
            None => bits,
        };
        let cidr = Cidr { address, prefix };
        (prefix <= bits && cidr.network_bits(address) == bits_of(address)).then_some(cidr)
    }

    const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Cidr {
        Cidr { address: IpAddr::V4(Ipv4Addr::new(a, b, c, d)), prefix }
    }

    const fn v6(segments: [u16; 8], prefix: u8) -> Cidr {
        let [a, b, c, d, e, f, g, h] = segments;
        Cidr { address: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)), prefix }
    }

    fn contains(&self, address: IpAddr) -> bool {
        match (self.address, address) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                self.network_bits(address) == self.network_bits(self.address)
            }
            _ => false,
        }
    }

    /// `address` with the bits past the prefix cleared.
    fn network_bits(&self, address: IpAddr) -> u128 {
        let (value, width) = match address {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32u32),
            IpAddr::V6(v6) => (u128::from(v6), 128u32),
        };
        let host_bits = width - u32::from(self.prefix).min(width);
        if host_bits >= 128 { 0 } else { (value >> host_bits) << host_bits }
    }
}

fn bits_of(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// IPv4 ranges that are not the public internet (IANA special-purpose registry), most specific
/// first where they nest.
const SPECIAL_V4: [(Cidr, &str); 15] = [
    (Cidr::v4(0, 0, 0, 0, 8), "unspecified (\"this network\")"),
    (Cidr::v4(10, 0, 0, 0, 8), "private"),
    (Cidr::v4(100, 64, 0, 0, 10), "shared (carrier-grade NAT)"),
    (Cidr::v4(127, 0, 0, 0, 8), "loopback"),
    (Cidr::v4(169, 254, 0, 0, 16), "link-local"),
    (Cidr::v4(172, 16, 0, 0, 12), "private"),
    (Cidr::v4(192, 0, 0, 0, 24), "reserved (IETF protocol assignments)"),
    (Cidr::v4(192, 0, 2, 0, 24), "reserved (documentation)"),
    (Cidr::v4(192, 88, 99, 0, 24), "reserved (6to4 relay anycast)"),
    (Cidr::v4(192, 168, 0, 0, 16), "private"),
    (Cidr::v4(198, 18, 0, 0, 15), "reserved (benchmarking)"),
    (Cidr::v4(198, 51, 100, 0, 24), "reserved (documentation)"),
    (Cidr::v4(203, 0, 113, 0, 24), "reserved (documentation)"),
    (Cidr::v4(224, 0, 0, 0, 4), "multicast"),
    (Cidr::v4(240, 0, 0, 0, 4), "reserved (including broadcast)"),
];

/// IPv6 ranges that are not the public internet, checked before the "outside `2000::/3`" rule.
const SPECIAL_V6: [(Cidr, &str); 12] = [
    (Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified"),
    (Cidr::v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback"),
    (Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 96), "reserved (IPv4-compatible)"),
    (Cidr::v6([0, 0, 0, 0, 0xffff, 0, 0, 0], 96), "reserved (IPv4-translated)"),
    (Cidr::v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), "reserved (local-use NAT64)"),
    (Cidr::v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), "reserved (discard-only)"),
    (Cidr::v6([0x2001, 0x0db8, 0, 0, 0, 0, 0, 0], 32), "reserved (documentation)"),
    (Cidr::v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23), "reserved (IETF protocol assignments, Teredo)"),
    (Cidr::v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), "reserved (documentation)"),
    (Cidr::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "unique-local"),
    (Cidr::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    (Cidr::v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), "site-local"),
];

/// Why `address` (canonical: IPv4-mapped IPv6 already turned into IPv4) is not a public
/// internet address; `None` when it is one.
fn special_class(address: IpAddr) -> Option<&'static str> {
    match address {
        IpAddr::V4(_) => SPECIAL_V4.iter().find(|(net, _)| net.contains(address)).map(|(_, class)| *class),
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                // NAT64 well-known prefix: reaches the embedded IPv4 address.
                let [a, b] = segments[6].to_be_bytes();
                let [c, d] = segments[7].to_be_bytes();
                return special_class(IpAddr::V4(Ipv4Addr::new(a, b, c, d)));
            }
            if segments[0] == 0x2002 {
                // 6to4: reaches the IPv4 address in bits 16..48.
                let [a, b] = segments[1].to_be_bytes();
                let [c, d] = segments[2].to_be_bytes();
                return special_class(IpAddr::V4(Ipv4Addr::new(a, b, c, d)));
            }
            if segments[0] >= 0xff00 {
                return Some("multicast");
            }
            if let Some((_, class)) = SPECIAL_V6.iter().find(|(net, _)| net.contains(address)) {
                return Some(class);
            }
            // Global unicast is 2000::/3; everything else is unassigned or reserved.
            (segments[0] & 0xe000 != 0x2000).then_some("reserved (outside global unicast)")
        }
    }
}

#[cfg(test)]
mod tests;
