use super::*;

fn strict() -> EndpointPolicy {
    EndpointPolicy::strict()
}

fn refused_class(policy: &EndpointPolicy, url: &str) -> &'static str {
    match policy.check(url) {
        Err(EndpointRefused::Address { class, .. }) => class,
        other => panic!("{url}: expected an address refusal, got {other:?}"),
    }
}

fn ip(text: &str) -> IpAddr {
    match text.parse() {
        Ok(ip) => ip,
        Err(e) => panic!("{text}: {e}"),
    }
}

#[test]
fn public_https_endpoints_pass_and_are_normalized() {
    let endpoint = strict().check("HTTPS://Hooks.Example.ORG/fhir/notify?token=a").expect("public https");
    assert_eq!(endpoint.as_str(), "https://hooks.example.org/fhir/notify?token=a");
    assert_eq!(endpoint.host(), "hooks.example.org");
    assert_eq!(endpoint.port(), 443);
    assert!(endpoint.needs_resolution());
    assert_eq!(endpoint.ip(), None);

    let literal = strict().check("https://93.184.216.34:8443/x").expect("public v4 literal");
    assert_eq!(literal.ip(), Some(ip("93.184.216.34")));
    assert_eq!(literal.port(), 8443);
    assert!(!literal.needs_resolution());
    assert!(strict().check("https://[2606:4700::1111]/").is_ok());
}

#[test]
fn http_needs_the_flag_or_an_allow_listed_host() {
    assert_eq!(strict().check("http://hooks.example.org/"), Err(EndpointRefused::InsecureHttp));
    let insecure = EndpointPolicy::new::<&str>(&[], true).expect("policy");
    assert!(insecure.allows_insecure_http());
    assert!(insecure.check("http://hooks.example.org/").is_ok());
    // The flag does not open private addresses.
    assert_eq!(refused_class(&insecure, "http://10.1.2.3/"), "private");

    let listed = EndpointPolicy::new(&["receiver.internal", "127.0.0.1"], false).expect("policy");
    assert!(listed.check("http://receiver.internal:8080/hook").is_ok());
    assert!(listed.check("http://RECEIVER.internal./hook").is_ok());
    assert!(listed.check("http://127.0.0.1:9999/hook").is_ok());
    assert_eq!(listed.check("http://other.example.org/"), Err(EndpointRefused::InsecureHttp));
}

#[test]
fn other_schemes_credentials_fragments_and_garbage_are_refused() {
    assert_eq!(strict().check("ftp://example.org/x"), Err(EndpointRefused::Scheme("ftp".to_owned())));
    assert_eq!(strict().check("file:///etc/passwd"), Err(EndpointRefused::Scheme("file".to_owned())));
    assert_eq!(strict().check("https://user:pw@example.org/"), Err(EndpointRefused::Credentials));
    assert_eq!(strict().check("https://example.org@10.0.0.1/"), Err(EndpointRefused::Credentials));
    assert_eq!(strict().check("https://example.org/#frag"), Err(EndpointRefused::Fragment));
    assert!(matches!(strict().check("example.org/hook"), Err(EndpointRefused::Malformed(_))));
    assert!(matches!(strict().check("https://exa\nmple.org/"), Err(EndpointRefused::Malformed(_))));
    assert!(matches!(strict().check(" https://example.org/"), Err(EndpointRefused::Malformed(_))));
}

#[test]
fn non_public_ipv4_literals_are_refused_by_class() {
    let cases = [
        ("https://127.0.0.1/", "loopback"),
        ("https://127.255.0.9/", "loopback"),
        ("https://10.0.0.1/", "private"),
        ("https://172.16.0.1/", "private"),
        ("https://172.31.255.255/", "private"),
        ("https://192.168.1.1/", "private"),
        ("https://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://100.64.0.1/", "shared (carrier-grade NAT)"),
        ("https://0.0.0.0/", "unspecified (\"this network\")"),
        ("https://224.0.0.1/", "multicast"),
        ("https://255.255.255.255/", "reserved (including broadcast)"),
        ("https://192.0.2.10/", "reserved (documentation)"),
        ("https://198.18.0.1/", "reserved (benchmarking)"),
    ];
    for (url, class) in cases {
        assert_eq!(refused_class(&strict(), url), class, "{url}");
    }
    // Neighbours of the private ranges are public.
    assert!(strict().check("https://172.32.0.1/").is_ok());
    assert!(strict().check("https://11.0.0.1/").is_ok());
    assert!(strict().check("https://100.128.0.1/").is_ok());
}

#[test]
fn obfuscated_ipv4_forms_are_read_as_the_client_reads_them() {
    for url in ["https://2130706433/", "https://0x7f.1/", "https://0177.0.0.1/", "https://127.1/"] {
        let refused = strict().check(url);
        assert_eq!(refused, Err(EndpointRefused::Address { address: ip("127.0.0.1"), class: "loopback" }), "{url}");
    }
    assert!(matches!(strict().check("https://%31%32%37.0.0.1/"), Err(EndpointRefused::Address { .. })));
}

#[test]
fn non_public_ipv6_literals_are_refused_including_mapped_and_embedded_ipv4() {
    let cases = [
        ("https://[::1]/", "loopback"),
        ("https://[::]/", "unspecified"),
        ("https://[fe80::1]/", "link-local"),
        ("https://[fd12:3456::1]/", "unique-local"),
        ("https://[fc00::1]/", "unique-local"),
        ("https://[fec0::1]/", "site-local"),
        ("https://[ff02::1]/", "multicast"),
        ("https://[2001:db8::1]/", "reserved (documentation)"),
        ("https://[::ffff:127.0.0.1]/", "loopback"),
        ("https://[::ffff:10.0.0.1]/", "private"),
        ("https://[::ffff:a9fe:a9fe]/", "link-local"),
        ("https://[64:ff9b::7f00:1]/", "loopback"),
        ("https://[2002:c0a8:0101::1]/", "private"),
        ("https://[2001::1]/", "reserved (IETF protocol assignments, Teredo)"),
        ("https://[::127.0.0.1]/", "reserved (IPv4-compatible)"),
        ("https://[4000::1]/", "reserved (outside global unicast)"),
    ];
    for (url, class) in cases {
        assert_eq!(refused_class(&strict(), url), class, "{url}");
    }
    // A mapped address is reported as the IPv4 address it is.
    assert_eq!(
        strict().check("https://[::ffff:192.168.0.1]/"),
        Err(EndpointRefused::Address { address: ip("192.168.0.1"), class: "private" })
    );
    // NAT64 and 6to4 of public IPv4 addresses are public.
    assert!(strict().check("https://[64:ff9b::5db8:d822]/").is_ok());
    assert!(strict().check("https://[2002:5db8:d822::1]/").is_ok());
}

#[test]
fn localhost_names_are_refused_unless_allow_listed() {
    assert_eq!(strict().check("https://localhost/"), Err(EndpointRefused::LocalName("localhost".to_owned())));
    assert_eq!(strict().check("https://api.localhost./"), Err(EndpointRefused::LocalName("api.localhost".to_owned())));
    let listed = EndpointPolicy::new(&["localhost"], false).expect("policy");
    assert!(listed.check("http://localhost:8080/").is_ok());
}

#[test]
fn allow_list_ips_and_cidrs_open_exactly_their_addresses() {
    let policy = EndpointPolicy::new(&["10.20.0.0/16", "::1", "fd00::/8"], false).expect("policy");
    assert!(policy.check("https://10.20.5.6/").is_ok());
    assert!(policy.check("http://10.20.5.6/").is_ok(), "an allow-listed address may use http");
    assert_eq!(refused_class(&policy, "https://10.21.0.1/"), "private");
    assert!(policy.check("https://[::1]:8443/").is_ok());
    assert!(policy.check("https://[fd00::5]/").is_ok());
    assert_eq!(refused_class(&policy, "https://[fc00::5]/"), "unique-local");
    // An IPv4 allow entry covers the IPv4-mapped form too.
    let v4 = EndpointPolicy::new(&["127.0.0.1"], false).expect("policy");
    assert!(v4.check("http://[::ffff:127.0.0.1]/").is_ok());
    assert_eq!(refused_class(&v4, "http://127.0.0.2/"), "loopback");
}

#[test]
fn invalid_allow_entries_are_reported() {
    for entry in ["10.0.0.1/8", "10.0.0.0/33", "::/129", "10.0.0.0/", "http://x/", "a b", ""] {
        assert_eq!(
            EndpointPolicy::new(&[entry], false),
            Err(InvalidAllowEntry(entry.to_owned())),
            "{entry:?} should be refused"
        );
    }
    let message = InvalidAllowEntry("x/y".to_owned()).to_string();
    assert_eq!(message, "invalid endpoint allow-list entry 'x/y': expected a host name, an IP address or a CIDR");
}

#[test]
fn resolved_addresses_are_checked_for_names() {
    let policy = EndpointPolicy::new(&["192.168.50.0/24", "hooks.corp.example"], false).expect("policy");
    let endpoint = policy.check("https://hooks.example.org/").expect("name");
    assert_eq!(policy.check_resolved(&endpoint, &[ip("93.184.216.34"), ip("2606:4700::1111")]), Ok(()));
    // One private answer among public ones is enough to refuse (DNS rebinding).
    assert_eq!(
        policy.check_resolved(&endpoint, &[ip("93.184.216.34"), ip("10.0.0.7")]),
        Err(EndpointRefused::Address { address: ip("10.0.0.7"), class: "private" })
    );
    assert_eq!(
        policy.check_resolved(&endpoint, &[ip("::ffff:127.0.0.1")]),
        Err(EndpointRefused::Address { address: ip("127.0.0.1"), class: "loopback" })
    );
    assert_eq!(policy.check_resolved(&endpoint, &[ip("192.168.50.9")]), Ok(()));
    assert_eq!(policy.check_resolved(&endpoint, &[]), Err(EndpointRefused::NoAddress));

    // An allow-listed name is trusted whatever it resolves to.
    let corp = policy.check("https://hooks.corp.example/").expect("listed name");
    assert_eq!(policy.check_resolved(&corp, &[ip("10.9.9.9")]), Ok(()));

    // An IP literal endpoint is judged by its literal, not by what the caller passes.
    let literal = policy.check("https://192.168.50.1/").expect("allow-listed literal");
    assert_eq!(policy.check_resolved(&literal, &[ip("10.0.0.1")]), Ok(()));
}

#[test]
fn refusal_messages_name_the_problem() {
    let refused = strict().check("https://10.0.0.1/").expect_err("private");
    assert_eq!(refused.to_string(), "address 10.0.0.1 is private and not allowed by this server");
    assert_eq!(EndpointRefused::InsecureHttp.to_string(), "http endpoints are not allowed by this server: use https");
    assert_eq!(EndpointRefused::Scheme("ws".to_owned()).to_string(), "scheme 'ws' is not supported: use https");
}
