use super::*;
use crate::netns_harness::{
    Failure, NetNs, TestResult, addr_entry, check, child_entry, ip_json, run, test_path,
};
use crate::vip::fake::FakeNetlink;

// ---- parsing -------------------------------------------------------

#[test]
fn parse_accepts_ipv4_and_ipv6_cidrs() {
    let v4 = Vip::parse("198.18.0.100/24", None).unwrap();
    assert_eq!(v4.addr, "198.18.0.100".parse::<IpAddr>().unwrap());
    assert_eq!(v4.prefix_len, 24);
    assert_eq!(v4.interface, None);
    assert_eq!(v4.to_string(), "198.18.0.100/24");

    let v6 = Vip::parse("2001:db8::100/64", Some("eth0")).unwrap();
    assert_eq!(v6.addr, "2001:db8::100".parse::<IpAddr>().unwrap());
    assert_eq!(v6.prefix_len, 64);
    assert_eq!(v6.interface.as_deref(), Some("eth0"));
    assert_eq!(v6.to_string(), "2001:db8::100/64");

    assert_eq!(Vip::parse("198.18.0.100/32", None).unwrap().prefix_len, 32);
    assert_eq!(Vip::parse("2001:db8::1/128", None).unwrap().prefix_len, 128);
    // Display round-trips.
    for s in ["198.18.0.100/24", "2001:db8::100/64", "10.0.0.1/0"] {
        assert_eq!(Vip::parse(s, None).unwrap().to_string(), s);
    }
}

#[test]
fn parse_refuses_bad_input_without_panicking() {
    let bad = [
        "",
        "/",
        "198.18.0.100",
        "198.18.0.100/",
        "/24",
        "abc/24",
        "198.18.0.100/33",
        "198.18.0.100/-1",
        "198.18.0.100/+4",
        "198.18.0.100/ 24",
        "198.18.0.100/24/1",
        "198.18.0.100/999999999999999999999",
        "2001:db8::1/129",
        " 198.18.0.100/24",
        "0.0.0.0/0",
        "::/0",
        "127.0.0.1/8",
        "::1/128",
        "224.0.0.1/4",
        "ff02::1/16",
        "255.255.255.255/32",
        "198.18.0.300/24",
    ];
    for input in bad {
        match Vip::parse(input, None) {
            Err(VipError::Parse { input: i, reason }) => {
                assert_eq!(i, input);
                assert!(!reason.is_empty());
            }
            other => panic!("{input:?} should be refused, got {other:?}"),
        }
    }
}

#[test]
fn parse_refuses_bad_interface_names() {
    for name in [
        "",
        ".",
        "..",
        "a/b",
        "eth 0",
        "eth0:1",
        "sixteen-chars-xx",
        "tab\t",
    ] {
        let err = Vip::parse("198.18.0.100/24", Some(name)).unwrap_err();
        assert!(
            err.to_string().contains("interface"),
            "{name:?}: unexpected message {err}"
        );
    }
    assert!(Vip::parse("198.18.0.100/24", Some("fifteen-chars-x")).is_ok());
}

// ---- lifetimes -----------------------------------------------------

#[test]
fn lifetime_cap_defaults_to_the_whole_bound() {
    let ms = Duration::from_millis;
    let s = Duration::from_secs;
    // The CRD defaults: D = 3 s, skew 500 ms.
    assert_eq!(lifetime_cap(s(3), ms(500), None).unwrap(), ms(3500));
    // The tight end: D = 1 s, skew 100 ms; no whole second needed any more.
    assert_eq!(lifetime_cap(s(1), ms(100), None).unwrap(), ms(1100));
    assert_eq!(lifetime_cap(s(1), s(0), None).unwrap(), s(1));
}

#[test]
fn lifetime_takes_configured_value_only_below_bound() {
    let s = Duration::from_secs;
    let ms = Duration::from_millis;
    assert_eq!(lifetime_cap(s(3), s(1), Some(3)).unwrap(), s(3));
    assert_eq!(lifetime_cap(s(3), s(1), Some(1)).unwrap(), s(1));
    assert_eq!(lifetime_cap(s(1), ms(1), Some(1)).unwrap(), s(1));
    for (d, skew, c) in [
        (s(3), s(1), 4),
        (s(3), s(1), 5),
        (s(1), s(0), 1),
        (s(3), s(1), 0),
    ] {
        let err = lifetime_cap(d, skew, Some(c)).unwrap_err();
        assert!(
            matches!(err, VipError::InvalidLifetime(_)),
            "{d:?}+{skew:?} configured {c}: {err}"
        );
    }
    let msg = lifetime_cap(s(3), s(1), Some(4)).unwrap_err().to_string();
    assert!(msg.contains("outlive the lease"), "{msg}");
}

#[test]
fn lifetime_handles_overflow() {
    assert!(lifetime_cap(Duration::MAX, Duration::from_secs(1), None).is_err());
    assert!(lifetime_cap(Duration::from_secs(u64::MAX / 2), Duration::ZERO, None).is_ok());
    assert!(
        lifetime_cap(
            Duration::from_secs(u64::MAX / 2),
            Duration::ZERO,
            Some(u32::MAX)
        )
        .is_ok()
    );
}

#[test]
fn kernel_lifetime_is_a_millisecond_fence_and_a_whole_second_address() {
    let ms = Duration::from_millis;
    // Fence to the millisecond; address 300 ms shorter in whole seconds.
    assert_eq!(kernel_lifetime(ms(3370)).unwrap(), (ms(3370), 3));
    assert_eq!(kernel_lifetime(ms(2999)).unwrap(), (ms(2999), 2));
    // Below 1.3 s: the address outlives the fence, silent behind it.
    assert_eq!(kernel_lifetime(ms(1200)).unwrap(), (ms(1200), 2));
    assert_eq!(kernel_lifetime(ms(970)).unwrap(), (ms(970), 1));
    assert_eq!(kernel_lifetime(ms(1)).unwrap(), (ms(1), 1));
    assert!(kernel_lifetime(Duration::from_micros(999)).is_err());
    assert!(kernel_lifetime(Duration::ZERO).is_err());
    assert!(kernel_lifetime(Duration::from_secs(u64::from(u32::MAX))).is_err());
    assert!(kernel_lifetime(Duration::MAX).is_err());
}

#[test]
fn error_messages_name_the_fix() {
    let vip = Vip::parse("203.0.113.5/24", None).unwrap();
    let msg = VipError::NoInterface(vip.to_string()).to_string();
    assert!(
        msg.contains("203.0.113.5/24") && msg.contains("spec.vips[].interface"),
        "{msg}"
    );
    let msg = VipError::InterfaceMissing("eth9".into()).to_string();
    assert!(msg.contains("\"eth9\""), "{msg}");
}

#[test]
fn rtnetlink_new_outside_a_runtime_is_an_error() {
    assert!(matches!(RtNetlink::new(), Err(VipError::NoRuntime)));
}

// ---- the trait is usable with a fake --------------------------------

/// A transition-like routine generic over the trait.
/// The instant `d` from now: what a VIP is held until.
fn after(d: Duration) -> std::time::Instant {
    std::time::Instant::now() + d
}

async fn hold_all<N: Netlink>(nl: &N, vips: &[Vip], lft: Duration) -> Result<usize, VipError> {
    for vip in vips {
        let iface = nl.interface_for(vip).await?;
        nl.add_vip(&iface, vip, after(lft)).await?;
    }
    Ok(vips.len())
}

#[tokio::test]
async fn netlink_trait_supports_fakes_and_spawned_tasks() {
    let fake = std::sync::Arc::new(FakeNetlink::default());
    let vips = vec![Vip::parse("198.18.0.100/24", None).unwrap()];
    // The futures are Send: the routine runs on a spawned task.
    let task = tokio::spawn({
        let fake = fake.clone();
        let vips = vips.clone();
        async move { hold_all(fake.as_ref(), &vips, Duration::from_secs(3)).await }
    });
    assert_eq!(task.await.unwrap().unwrap(), 1);
    assert!(fake.vip_present("kh-fake0", &vips[0]).await.unwrap());
    let uncovered = Vip::parse("203.0.113.5/24", None).unwrap();
    assert!(matches!(
        hold_all(fake.as_ref(), &[uncovered], Duration::from_secs(3)).await,
        Err(VipError::NoInterface(_))
    ));
}

#[test]
fn address_protocols_are_kept_from_linux_5_18() {
    use super::kernel::release_keeps_address_protocol as keeps;
    for release in [
        "5.18.0",
        "6.1.0-18-amd64",
        "6.18.44-fc-v1300",
        "10.0",
        "",
        "weird",
    ] {
        assert!(keeps(release), "{release}");
    }
    for release in [
        "5.15.0-91-generic",
        "5.14.0-362.el9.x86_64",
        "4.18.0-513.el8.x86_64",
    ] {
        assert!(!keeps(release), "{release}");
    }
}

#[test]
fn without_address_protocols_only_permanent_addresses_are_the_hosts() {
    use super::kernel::is_kubeha_address_on;
    use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressProtocol};
    let vip = Vip::parse("198.18.0.100/24", None).unwrap();
    let mut plain = kernel::address_message(1, &vip);
    let mut permanent = plain.clone();
    permanent
        .attributes
        .push(AddressAttribute::Flags(AddressFlags::Permanent));
    // A recent kernel: only the protocol mark makes an address kubeha's.
    assert!(!is_kubeha_address_on(&plain, true));
    assert!(!is_kubeha_address_on(&permanent, true));
    // An old one: any address with a lifetime counts as kubeha's.
    assert!(is_kubeha_address_on(&plain, false));
    assert!(!is_kubeha_address_on(&permanent, false));
    plain
        .attributes
        .push(AddressAttribute::Protocol(AddressProtocol::from(
            KUBEHA_ADDRESS_PROTOCOL,
        )));
    assert!(is_kubeha_address_on(&plain, true));
}

#[tokio::test]
async fn the_fake_refuses_the_hosts_own_address_like_the_kernel_does() {
    let fake = FakeNetlink::default();
    let own = Vip::parse("198.18.0.1/24", None).unwrap();
    match fake
        .add_vip("kh-fake0", &own, after(Duration::from_secs(3)))
        .await
    {
        Err(VipError::ForeignAddress { address, interface }) => {
            assert_eq!((address, interface.as_str()), (own.addr, "kh-fake0"));
        }
        other => panic!("expected ForeignAddress, got {other:?}"),
    }
    assert!(fake.addrs.lock().unwrap().is_empty());
}

// ---- real kernel, inside throwaway namespaces -------------------------

/// Runs `case` of [`netns_child`] in a fresh namespace with the test links.
fn kernel_case(case: &str) -> TestResult {
    let ns = NetNs::with_lab_links(case)?;
    ns.run_case(&test_path(module_path!(), "netns_child"), case)
}

#[test]
fn kernel_add_vip_sets_and_extends_lifetime() -> TestResult {
    kernel_case("add-extend")
}

#[test]
fn kernel_del_vip_is_idempotent() -> TestResult {
    kernel_case("del-idempotent")
}

#[test]
fn kernel_interface_for_picks_the_subnet_interface() -> TestResult {
    kernel_case("interface-for")
}

#[test]
fn kernel_fence_expires_vips_by_themselves() -> TestResult {
    kernel_case("kernel-fence")
}

#[test]
fn kernel_packet_fence_silences_a_vip_at_its_end_while_the_address_stays() -> TestResult {
    kernel_case("packet-fence")
}

#[test]
fn kernel_packet_fence_silences_ipv4_and_ipv6_for_a_host_on_the_link() -> TestResult {
    kernel_case("packet-fence-peer")
}

#[test]
fn kernel_mac_of_reads_the_link_address() -> TestResult {
    kernel_case("mac-of")
}

#[test]
fn kernel_default_route_add_and_del_are_idempotent() -> TestResult {
    kernel_case("default-route")
}

#[test]
fn kernel_never_takes_over_an_address_kubeha_did_not_add() -> TestResult {
    kernel_case("foreign-address")
}

#[test]
fn kernel_address_reads_over_one_connection_never_collide() -> TestResult {
    kernel_case("dump-under-churn")
}

/// Child side: does nothing unless started by [`NetNs::run_case`].
/// Ignored in a normal run: it is an entry point, not a test of its own.
#[test]
#[ignore = "entry point of the namespace child process"]
fn netns_child() {
    child_entry(|case| async move {
        match case.as_str() {
            "add-extend" => case_add_extend().await,
            "del-idempotent" => case_del_idempotent().await,
            "interface-for" => case_interface_for().await,
            "kernel-fence" => case_kernel_fence().await,
            "packet-fence" => case_packet_fence().await,
            "packet-fence-peer" => case_packet_fence_from_a_peer().await,
            "mac-of" => case_mac_of().await,
            "default-route" => case_default_route().await,
            "dump-under-churn" => case_dump_under_churn().await,
            "foreign-address" => case_foreign_address().await,
            other => Err(format!("unknown case {other}").into()),
        }
    });
}

fn lifetimes(entry: &serde_json::Value) -> (u64, u64) {
    let get = |k: &str| entry.get(k).and_then(|v| v.as_u64()).unwrap_or(u64::MAX);
    (get("valid_life_time"), get("preferred_life_time"))
}

/// The on-link routes of the base addresses on veth0 survive VIP removal.
fn base_routes_intact() -> TestResult {
    for (family, prefix) in [("-4", "198.18.0.0/24"), ("-6", "2001:db8::/64")] {
        let routes = ip_json(&[family, "route", "show", prefix, "dev", "veth0"])?;
        let n = routes.as_array().map_or(0, Vec::len);
        check!(n == 1, "route {prefix} on veth0: {routes}");
        check!(
            routes.get(0).and_then(|r| r.get("expires")).is_none(),
            "route {prefix} got an expiry from the VIP: {routes}"
        );
    }
    Ok(())
}

fn flag(entry: &serde_json::Value, name: &str) -> bool {
    entry.get(name).and_then(|v| v.as_bool()).unwrap_or(false)
}

async fn case_add_extend() -> TestResult {
    let nl = RtNetlink::new()?;
    for cidr in ["198.18.0.100/24", "2001:db8::100/64"] {
        let vip = Vip::parse(cidr, None)?;
        check!(
            !nl.vip_present("veth0", &vip).await?,
            "{vip} present before add"
        );

        nl.add_vip("veth0", &vip, after(Duration::from_secs(30)))
            .await?;
        let entry = addr_entry("veth0", vip.addr)?.ok_or(format!("{vip} not added"))?;
        let (valid, preferred) = lifetimes(&entry);
        check!(
            (25..=30).contains(&valid),
            "{vip}: valid_life_time {valid}, asked 30"
        );
        check!(
            (25..=30).contains(&preferred),
            "{vip}: preferred_life_time {preferred}"
        );
        check!(
            entry.get("prefixlen").and_then(|p| p.as_u64()) == Some(u64::from(vip.prefix_len)),
            "{vip}: wrong prefix in {entry}"
        );
        check!(
            nl.vip_present("veth0", &vip).await?,
            "vip_present false after add"
        );
        if vip.addr.is_ipv6() {
            check!(
                !flag(&entry, "tentative"),
                "{vip} is tentative (DAD ran): {entry}"
            );
            check!(flag(&entry, "nodad"), "{vip} lacks nodad: {entry}");
        }

        // Renew: the address exists, the lifetime is replaced (extended).
        nl.add_vip("veth0", &vip, after(Duration::from_secs(60)))
            .await?;
        let entry = addr_entry("veth0", vip.addr)?.ok_or(format!("{vip} vanished"))?;
        let (valid, preferred) = lifetimes(&entry);
        check!(
            (55..=60).contains(&valid),
            "{vip}: after renew valid {valid}, asked 60"
        );
        check!(
            (55..=60).contains(&preferred),
            "{vip}: after renew preferred {preferred}"
        );
        if vip.addr.is_ipv6() {
            check!(!flag(&entry, "tentative"), "{vip} tentative after renew");
        }

        // The lifetime is set, not maxed: a shorter renewal shortens it.
        nl.add_vip("veth0", &vip, after(Duration::from_secs(10)))
            .await?;
        let entry = addr_entry("veth0", vip.addr)?.ok_or(format!("{vip} vanished"))?;
        let (valid, _) = lifetimes(&entry);
        check!(valid <= 10, "{vip}: valid {valid} after asking 10");

        // Exactly one copy of the address.
        let count = ip_json(&["addr", "show", "dev", "veth0"])?
            .to_string()
            .matches(&format!("\"{}\"", vip.addr))
            .count();
        check!(count == 1, "{vip} appears {count} times");
    }

    // One renew round for all held VIPs (one address dump): present ones
    // are extended, a missing one or one on a missing interface is not,
    // and nothing is added.
    let round: Vec<(String, Vip)> = [
        ("veth0", "198.18.0.100/24"),
        ("veth0", "198.18.0.102/24"),
        ("veth0", "2001:db8::100/64"),
        ("nosuch0", "198.18.0.103/24"),
    ]
    .iter()
    .map(|(i, c)| Ok::<_, VipError>(((*i).to_owned(), Vip::parse(c, None)?)))
    .collect::<Result<_, _>>()?;
    let results = nl.extend_vips(&round, after(Duration::from_secs(40))).await;
    let summary: Vec<String> = results.iter().map(|r| format!("{r:?}")).collect();
    check!(
        matches!(
            results.as_slice(),
            [
                Ok(true),
                Ok(false),
                Ok(true),
                Err(VipError::InterfaceMissing(_))
            ]
        ),
        "extend_vips: {summary:?}"
    );
    for cidr in ["198.18.0.100/24", "2001:db8::100/64"] {
        let addr = Vip::parse(cidr, None)?.addr;
        let entry = addr_entry("veth0", addr)?.ok_or(format!("{cidr} vanished"))?;
        let (valid, _) = lifetimes(&entry);
        check!(
            (35..=40).contains(&valid),
            "{cidr}: valid {valid} after a round asking 40"
        );
    }
    check!(
        addr_entry("veth0", Vip::parse("198.18.0.102/24", None)?.addr)?.is_none(),
        "extend_vips added a missing VIP"
    );

    let vip = Vip::parse("198.18.0.101/24", None)?;
    let err = nl
        .add_vip("nosuch0", &vip, after(Duration::from_secs(5)))
        .await;
    check!(
        matches!(&err, Err(VipError::InterfaceMissing(n)) if n == "nosuch0"),
        "add on a missing interface: {err:?}"
    );
    let err = nl
        .add_vip(
            "veth0",
            &vip,
            std::time::Instant::now() - Duration::from_millis(1),
        )
        .await;
    check!(
        matches!(err, Err(VipError::PastLeaseEnd)),
        "an end in the past: {err:?}"
    );
    check!(
        !nl.vip_present("veth0", &vip).await?,
        "{vip} added past its end"
    );
    // Below a second: the packet fence to the millisecond, the address
    // with its one-second minimum.
    nl.add_vip("veth0", &vip, after(Duration::from_millis(500)))
        .await?;
    let entry = addr_entry("veth0", vip.addr)?.ok_or(format!("{vip} not added"))?;
    check!(lifetimes(&entry).0 <= 1, "{vip}: {entry}");
    nl.del_vip("veth0", &vip).await?;
    check!(
        addr_entry("veth0", vip.addr)?.is_none(),
        "{vip} added despite the error"
    );
    Ok(())
}

/// Twenty VIPs of each family come and go in bursts while ten tasks
/// read the addresses over one connection (as when many services enter
/// one node at once): every read succeeds, though the kernel refuses a
/// second dump on a socket while one runs (EBUSY).
async fn case_dump_under_churn() -> TestResult {
    let nl = RtNetlink::new()?;
    let churner = RtNetlink::new()?;
    let vips: Vec<Vip> = (0..20)
        .flat_map(|k| {
            [
                format!("198.18.0.{}/24", 150 + k),
                format!("2001:db8::{:x}/64", 0x150 + k),
            ]
        })
        .map(|c| Vip::parse(&c, None))
        .collect::<Result<_, _>>()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        let vips = vips.clone();
        tokio::spawn(async move {
            let mut rounds = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for vip in &vips {
                    churner
                        .add_vip("veth0", vip, after(Duration::from_secs(30)))
                        .await?;
                }
                for vip in &vips {
                    churner.del_vip("veth0", vip).await?;
                }
                rounds += 1;
                // Bursts, not a storm: a pause as between two handovers.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<u32, VipError>(rounds)
        })
    };
    // Ten readers share one connection, as the tasks of ten services
    // entering one node at once do.
    let readers: Vec<_> = (0..10)
        .map(|r| {
            let nl = nl.clone();
            let probe = vips[r].clone();
            tokio::spawn(async move {
                let mut failures = Vec::new();
                for _ in 0..200 {
                    if let Err(e) = nl.vip_present("veth0", &probe).await {
                        failures.push(e.to_string());
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for r in readers {
        failures.extend(r.await.map_err(|e| e.to_string())?);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = churn.await.map_err(|e| e.to_string())??;
    check!(rounds > 0, "the churn never ran a round");
    check!(
        failures.is_empty(),
        "{} of 2000 address reads failed during {rounds} rounds of churn, e.g. {}",
        failures.len(),
        failures[0]
    );
    Ok(())
}

async fn case_del_idempotent() -> TestResult {
    let nl = RtNetlink::new()?;
    for cidr in ["198.18.0.100/24", "2001:db8::100/64"] {
        let vip = Vip::parse(cidr, None)?;
        nl.add_vip("veth0", &vip, after(Duration::from_secs(30)))
            .await?;
        check!(addr_entry("veth0", vip.addr)?.is_some(), "{vip} not added");
        nl.del_vip("veth0", &vip).await?;
        check!(
            addr_entry("veth0", vip.addr)?.is_none(),
            "{vip} still there after del"
        );
        check!(
            !nl.vip_present("veth0", &vip).await?,
            "vip_present after del"
        );
        nl.del_vip("veth0", &vip).await?;
        // Never added, and an interface that does not exist.
        let other = Vip::parse(
            if vip.addr.is_ipv4() {
                "198.18.0.222/24"
            } else {
                "2001:db8::222/64"
            },
            None,
        )?;
        nl.del_vip("veth0", &other).await?;
        nl.del_vip("nosuch0", &vip).await?;
    }
    base_routes_intact()?;
    // The base addresses are untouched.
    check!(
        addr_entry("veth0", "198.18.0.1".parse().map_err(|_| "ip")?)?.is_some(),
        "base v4 gone"
    );
    check!(
        addr_entry("veth0", "2001:db8::1".parse().map_err(|_| "ip")?)?.is_some(),
        "base v6 gone"
    );
    Ok(())
}

async fn case_interface_for() -> TestResult {
    let nl = RtNetlink::new()?;
    let expect = [
        ("198.18.0.100/24", "veth0"),
        ("2001:db8::100/64", "veth0"),
        ("198.19.0.7/24", "dummy0"),
        ("2001:db8:1::7/64", "dummy0"),
    ];
    for (cidr, want) in expect {
        let got = nl.interface_for(&Vip::parse(cidr, None)?).await?;
        check!(got == want, "{cidr}: got {got}, want {want}");
    }
    // A named interface wins over the subnet.
    let named = Vip::parse("198.18.0.100/24", Some("dummy0"))?;
    let got = nl.interface_for(&named).await?;
    check!(got == "dummy0", "named interface: got {got}");
    let missing = Vip::parse("198.18.0.100/24", Some("nosuch0"))?;
    let err = nl.interface_for(&missing).await;
    check!(
        matches!(&err, Err(VipError::InterfaceMissing(n)) if n == "nosuch0"),
        "missing named interface: {err:?}"
    );

    // Uncovered: a clear error naming the VIP and the fix.
    let uncovered = Vip::parse("203.0.113.5/24", None)?;
    match nl.interface_for(&uncovered).await {
        Err(e @ VipError::NoInterface(_)) => {
            let msg = e.to_string();
            check!(
                msg.contains("203.0.113.5/24") && msg.contains("spec.vips[].interface"),
                "unclear message: {msg}"
            );
        }
        other => return Err(format!("uncovered VIP: {other:?}").into()),
    }
    // A VIP does not cover itself: adding it somewhere changes nothing.
    nl.add_vip("dummy0", &uncovered, after(Duration::from_secs(30)))
        .await?;
    let err = nl.interface_for(&uncovered).await;
    check!(
        matches!(err, Err(VipError::NoInterface(_))),
        "VIP covered itself: {err:?}"
    );

    // A VIP already held keeps resolving to the interface of its subnet.
    let held = Vip::parse("198.18.0.100/24", None)?;
    nl.add_vip("veth0", &held, after(Duration::from_secs(30)))
        .await?;
    let got = nl.interface_for(&held).await?;
    check!(got == "veth0", "held VIP: got {got}");

    // Longest prefix wins.
    crate::netns_harness::run("ip", &["addr", "add", "198.18.0.129/25", "dev", "dummy0"])?;
    let got = nl
        .interface_for(&Vip::parse("198.18.0.200/24", None)?)
        .await?;
    check!(got == "dummy0", "longest prefix: got {got}");
    let got = nl
        .interface_for(&Vip::parse("198.18.0.20/24", None)?)
        .await?;
    check!(got == "veth0", "outside the /25: got {got}");
    Ok(())
}

async fn case_kernel_fence() -> TestResult {
    let nl = RtNetlink::new()?;
    let vips = [
        Vip::parse("198.18.0.100/24", None)?,
        Vip::parse("2001:db8::100/64", None)?,
    ];
    let start = std::time::Instant::now();
    for vip in &vips {
        nl.add_vip("veth0", vip, after(Duration::from_secs(3)))
            .await?;
    }
    let mut gone_at = [None, None];
    while start.elapsed() < Duration::from_secs(6) && gone_at.iter().any(Option::is_none) {
        for (i, vip) in vips.iter().enumerate() {
            if gone_at[i].is_none() && !nl.vip_present("veth0", vip).await? {
                gone_at[i] = Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (vip, gone) in vips.iter().zip(gone_at) {
        let gone = gone.ok_or(format!("{vip} still present 6 s after a 2 s lifetime"))?;
        // Held 3 s: the packet fence for 3 s, the address 2 s (0.3 s of
        // margin, whole seconds).
        println!("{vip}: expired by the kernel after {gone:?}");
        check!(
            gone >= Duration::from_millis(1500),
            "{vip} vanished too early: {gone:?}"
        );
        check!(
            gone <= Duration::from_millis(4000),
            "{vip} outlived its lifetime: {gone:?}"
        );
        // An extension never brings an expired VIP back.
        check!(
            !nl.extend_vip("veth0", vip, after(Duration::from_secs(30)))
                .await?,
            "extending the expired {vip} reported it present"
        );
        check!(
            !nl.vip_present("veth0", vip).await?,
            "extending the expired {vip} added it back"
        );
        // A present one is extended.
        nl.add_vip("veth0", vip, after(Duration::from_secs(2)))
            .await?;
        check!(
            nl.extend_vip("veth0", vip, after(Duration::from_secs(30)))
                .await?,
            "extending the present {vip} reported it gone"
        );
        let entry = addr_entry("veth0", vip.addr)?.ok_or(format!("{vip} vanished"))?;
        let (valid, _) = lifetimes(&entry);
        check!(
            (25..=30).contains(&valid),
            "{vip}: valid {valid} after extending to 30"
        );
        nl.del_vip("veth0", vip).await?;
    }
    base_routes_intact()
}

/// Whether the kernel answers an ARP probe for `vip` sent from veth1 (the
/// peer of veth0, where the VIP sits).
async fn answered(nl: &RtNetlink, vip: &Vip) -> Result<bool, Failure> {
    let IpAddr::V4(v4) = vip.addr else {
        return Err("ARP probes are for IPv4".into());
    };
    let mac = nl.mac_of("veth1").await?;
    let found = tokio::task::spawn_blocking(move || {
        crate::garp::still_answered("veth1", mac, &[v4], Duration::from_millis(60))
    })
    .await
    .map_err(|e| format!("probe task: {e}"))?
    .map_err(|e| format!("probe: {e}"))?;
    Ok(!found.is_empty())
}

async fn case_packet_fence() -> TestResult {
    let nl = RtNetlink::new()?;
    nl.install_fence().await?;
    let vip = Vip::parse("198.18.0.100/24", None)?;
    let v6 = Vip::parse("2001:db8::100/64", None)?;
    check!(
        !answered(&nl, &vip).await?,
        "{vip} answered before it was added"
    );
    let start = std::time::Instant::now();
    nl.add_vip("veth0", &vip, start + Duration::from_millis(600))
        .await?;
    nl.add_vip("veth0", &v6, start + Duration::from_millis(600))
        .await?;
    check!(
        answered(&nl, &vip).await?,
        "{vip} unanswered while its fence is open"
    );
    // Past the fence's end: silent, although the address (one second at
    // least) is still there.
    tokio::time::sleep(
        (start + Duration::from_millis(650)).saturating_duration_since(std::time::Instant::now()),
    )
    .await;
    check!(
        nl.vip_present("veth0", &vip).await?,
        "{vip}: the address went with the fence"
    );
    check!(
        !answered(&nl, &vip).await?,
        "{vip} answered after its fence ended"
    );
    // A renew that comes too late extends nothing and opens nothing.
    for v in [&vip, &v6] {
        check!(
            !nl.extend_vip("veth0", v, after(Duration::from_secs(3)))
                .await?,
            "{v}: a late renew extended an expired fence"
        );
    }
    check!(
        !answered(&nl, &vip).await?,
        "{vip} answered after a late renew"
    );
    // One renew round over an expired VIP and a live one: the batch that
    // extends both fences at once fails whole, then each is tried on its
    // own: the live one is extended, the expired one stays closed.
    let live = Vip::parse("198.18.0.104/24", None)?;
    nl.add_vip("veth0", &live, after(Duration::from_secs(3)))
        .await?;
    let round = vec![
        ("veth0".to_owned(), vip.clone()),
        ("veth0".to_owned(), live.clone()),
    ];
    let results = nl.extend_vips(&round, after(Duration::from_secs(3))).await;
    check!(
        matches!(results.as_slice(), [Ok(false), Ok(true)]),
        "a round over an expired and a live VIP: {results:?}"
    );
    check!(
        !answered(&nl, &vip).await? && answered(&nl, &live).await?,
        "after the mixed round: {vip} must stay silent, {live} answer"
    );
    // A round over live VIPs only: one batch, both extended.
    nl.add_vip("veth0", &vip, after(Duration::from_secs(3)))
        .await?;
    let results = nl.extend_vips(&round, after(Duration::from_secs(3))).await;
    check!(
        matches!(results.as_slice(), [Ok(true), Ok(true)]),
        "a round over two live VIPs: {results:?}"
    );
    nl.del_vip("veth0", &live).await?;
    // Entered again: answered again, until it is removed.
    nl.add_vip("veth0", &vip, after(Duration::from_secs(3)))
        .await?;
    check!(
        answered(&nl, &vip).await?,
        "{vip} unanswered after entering again"
    );
    check!(
        nl.extend_vip("veth0", &vip, after(Duration::from_secs(3)))
            .await?,
        "{vip}: a renew in time did not extend"
    );
    nl.del_vip("veth0", &vip).await?;
    nl.del_vip("veth0", &v6).await?;
    check!(
        !answered(&nl, &vip).await?,
        "{vip} answered after it was removed"
    );
    base_routes_intact()
}

/// A namespace deleted when dropped.
struct PeerNs(String);

impl Drop for PeerNs {
    fn drop(&mut self) {
        let _ = crate::netns_harness::run("ip", &["netns", "del", &self.0]);
    }
}

/// Whether one ping from namespace `ns` to each of `addrs`, all at once,
/// is answered within 0.5 s.
fn pings(ns: &str, addrs: &[String]) -> Vec<bool> {
    let children: Vec<_> = addrs
        .iter()
        .map(|a| {
            std::process::Command::new("ip")
                .args([
                    "netns", "exec", ns, "ping", "-n", "-q", "-c", "1", "-W", "0.5", a,
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.and_then(|mut c| c.wait()).is_ok_and(|s| s.success()))
        .collect()
}

/// A host on the link (veth1 moved to a namespace of its own): it reaches
/// both VIPs (ARP, neighbour discovery, ICMP) while their fences are open,
/// and neither once they ended, its neighbour cache flushed, although both
/// addresses are still on veth0.
async fn case_packet_fence_from_a_peer() -> TestResult {
    use crate::netns_harness::run;
    let nl = RtNetlink::new()?;
    nl.install_fence().await?;
    let peer = format!("kubeha-ut-peer-{}", std::process::id());
    run("ip", &["netns", "add", &peer])?;
    let _peer = PeerNs(peer.clone());
    run("ip", &["link", "set", "veth1", "netns", &peer])?;
    run(
        "ip",
        &["-n", &peer, "addr", "add", "198.18.0.2/24", "dev", "veth1"],
    )?;
    run(
        "ip",
        &[
            "-n",
            &peer,
            "addr",
            "add",
            "2001:db8::2/64",
            "dev",
            "veth1",
            "nodad",
        ],
    )?;
    run("ip", &["-n", &peer, "link", "set", "veth1", "up"])?;
    let vips = [
        Vip::parse("198.18.0.100/24", None)?,
        Vip::parse("2001:db8::100/64", None)?,
    ];
    let addrs: Vec<String> = vips.iter().map(|v| v.addr.to_string()).collect();
    let start = std::time::Instant::now();
    // 1.2 s of fence: the addresses get 2 s, and outlive it.
    for v in &vips {
        nl.add_vip("veth0", v, start + Duration::from_millis(1200))
            .await?;
    }
    let open = pings(&peer, &addrs);
    check!(
        open == [true, true],
        "unreachable while the fences are open: {addrs:?} {open:?}"
    );
    tokio::time::sleep(
        (start + Duration::from_millis(1250)).saturating_duration_since(std::time::Instant::now()),
    )
    .await;
    run("ip", &["-n", &peer, "neigh", "flush", "all"])?;
    for v in &vips {
        check!(
            nl.vip_present("veth0", v).await?,
            "{v}: the address went with the fence"
        );
    }
    let closed = pings(&peer, &addrs);
    check!(
        closed == [false, false],
        "reachable after the fences ended: {addrs:?} {closed:?}"
    );
    for v in &vips {
        check!(
            nl.vip_present("veth0", v).await?,
            "{v}: the address went before the pings ended"
        );
    }
    Ok(())
}

async fn case_mac_of() -> TestResult {
    let nl = RtNetlink::new()?;
    let links = ip_json(&["link", "show", "dev", "veth0"])?;
    let want = links
        .get(0)
        .and_then(|l| l.get("address"))
        .and_then(|a| a.as_str())
        .ok_or("no address in ip -j link")?
        .to_string();
    let mac = nl.mac_of("veth0").await?;
    let got = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    check!(got == want, "mac_of veth0 = {got}, ip says {want}");
    let err = nl.mac_of("lo").await;
    check!(matches!(err, Err(VipError::NoMac(_))), "mac_of lo: {err:?}");
    let err = nl.mac_of("nosuch0").await;
    check!(
        matches!(err, Err(VipError::InterfaceMissing(_))),
        "mac_of nosuch0: {err:?}"
    );
    Ok(())
}

async fn case_default_route() -> TestResult {
    let nl = RtNetlink::new()?;
    for (family, gw, other) in [
        ("-4", "198.18.0.254", "198.18.0.253"),
        ("-6", "2001:db8::fe", "2001:db8::fd"),
    ] {
        let gw: IpAddr = gw.parse().map_err(|_| "gateway")?;
        let other: IpAddr = other.parse().map_err(|_| "gateway")?;
        let gateways = || -> Result<Vec<String>, crate::netns_harness::Failure> {
            Ok(ip_json(&[family, "route", "show", "default"])?
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.get("gateway").and_then(|g| g.as_str()).map(String::from))
                .collect())
        };
        check!(
            gateways()?.is_empty(),
            "a default route exists before the test"
        );
        nl.add_default_route(gw).await?;
        nl.add_default_route(gw).await?;
        check!(
            gateways()? == vec![gw.to_string()],
            "after add: {:?}",
            gateways()?
        );
        let err = nl.add_default_route(other).await;
        check!(
            matches!(&err, Err(VipError::DefaultRouteConflict { existing, .. }) if existing.contains(&gw.to_string())),
            "conflicting default route: {err:?}"
        );
        // Deleting a default route via another gateway leaves ours alone.
        nl.del_default_route(other).await?;
        check!(
            gateways()? == vec![gw.to_string()],
            "del of other removed ours"
        );
        nl.del_default_route(gw).await?;
        nl.del_default_route(gw).await?;
        check!(gateways()?.is_empty(), "after del: {:?}", gateways()?);

        // A default route the admin installed (protocol boot) via the same
        // gateway is adopted by add and left alone by del.
        let gw_s = gw.to_string();
        let admin = [
            family, "route", "add", "default", "via", &gw_s, "proto", "boot",
        ];
        crate::netns_harness::run("ip", &admin)?;
        nl.add_default_route(gw).await?;
        nl.del_default_route(gw).await?;
        check!(
            gateways()? == vec![gw_s.clone()],
            "the admin's default route was removed"
        );
        crate::netns_harness::run("ip", &[family, "route", "del", "default", "via", &gw_s])?;
    }
    Ok(())
}

/// The host's own addresses (permanent, or dynamic but not kubeha's) are
/// never replaced, extended or deleted: the add is refused naming the
/// address and interface, and the kernel is unchanged. kubeha's own
/// addresses (the protocol mark) are extended as before.
async fn case_foreign_address() -> TestResult {
    let nl = RtNetlink::new()?;
    // Another program's address with a finite lifetime.
    run(
        "ip",
        &[
            "addr",
            "add",
            "198.18.0.60/24",
            "dev",
            "veth0",
            "valid_lft",
            "100",
            "preferred_lft",
            "100",
        ],
    )?;
    for (cidr, iface, on) in [
        ("198.18.0.1/24", None, "veth0"),
        ("198.18.0.1/32", None, "veth0"),
        ("198.18.0.1/24", Some("dummy0"), "veth0"),
        ("2001:db8::1/64", None, "veth0"),
        ("198.19.0.1/24", None, "dummy0"),
        ("198.18.0.60/24", None, "veth0"),
    ] {
        let vip = Vip::parse(cidr, iface)?;
        let before = addr_entry(on, vip.addr)?.ok_or(format!("{vip}: base address missing"))?;
        let target = iface.unwrap_or(on);
        match nl
            .add_vip(target, &vip, after(Duration::from_secs(30)))
            .await
        {
            Err(VipError::ForeignAddress { address, interface }) => {
                check!(
                    address == vip.addr && interface == on,
                    "{vip}: named {address} on {interface}"
                );
                let message = VipError::ForeignAddress { address, interface }.to_string();
                check!(
                    message.contains(&vip.addr.to_string()) && message.contains(on),
                    "{vip}: message {message}"
                );
            }
            other => {
                return Err(
                    format!("{vip} on {target}: expected ForeignAddress, got {other:?}").into(),
                );
            }
        }
        check!(
            !nl.vip_present(target, &vip).await?,
            "{vip}: the host's address counts as kubeha's"
        );
        match nl
            .extend_vip(target, &vip, after(Duration::from_secs(30)))
            .await
        {
            Err(VipError::ForeignAddress { .. }) => {}
            other => return Err(format!("{vip}: extend should be refused, got {other:?}").into()),
        }
        let results = nl
            .extend_vips(
                &[(target.to_owned(), vip.clone())],
                after(Duration::from_secs(30)),
            )
            .await;
        check!(
            matches!(&results[..], [Err(VipError::ForeignAddress { .. })]),
            "{vip}: extend_vips gave {results:?}"
        );
        nl.del_vip(target, &vip).await?;
        let after_all = addr_entry(on, vip.addr)?.ok_or(format!("{vip}: deleted by del_vip"))?;
        check!(
            lifetimes(&after_all) == lifetimes(&before)
                || (vip.addr.to_string() == "198.18.0.60" && lifetimes(&after_all).0 <= 100),
            "{vip}: lifetimes changed from {before} to {after_all}"
        );
        check!(
            vip.addr.to_string() == "198.18.0.60" || lifetimes(&after_all).0 == u64::from(u32::MAX),
            "{vip}: the permanent address became temporary: {after_all}"
        );
    }
    // kubeha's own: added, extended, found and deleted as before.
    let vip = Vip::parse("198.18.0.100/24", None)?;
    nl.add_vip("veth0", &vip, after(Duration::from_secs(30)))
        .await?;
    nl.add_vip("veth0", &vip, after(Duration::from_secs(20)))
        .await?;
    check!(
        nl.vip_present("veth0", &vip).await?,
        "{vip} not kubeha's after add"
    );
    check!(
        nl.extend_vip("veth0", &vip, after(Duration::from_secs(30)))
            .await?,
        "{vip} not extended"
    );
    nl.del_vip("veth0", &vip).await?;
    check!(
        addr_entry("veth0", vip.addr)?.is_none(),
        "{vip} left behind"
    );
    base_routes_intact()
}
