//! Lab test: dual-stack VXLAN (EnableIPv6 with IPv6Network), as Flannel does it: leases keyed
//! `<v4>-<len>&<v6>-<len>` with PublicIPv6 and BackendV6Data, a second device flannel-v6.<VNI>,
//! subnet.env with the IPv6 lines, and pods reaching each other over both families. The IPv6
//! underlay uses the documentation range 2001:db8::/32.

mod common;

use std::net::{IpAddr, Ipv6Addr};

use common::{cluster, wait_for, DEADLINE, PREFIX};
use twill_formats::subnet_env::SubnetEnv;
use twill_lab::Ipv4Net;

const DUAL: &str = r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00:42::/56","Backend":{"Type":"vxlan"}}"#;

fn v6_underlay(idx: u32) -> Ipv6Addr {
    format!("2001:db8::{}", 10 + idx).parse().unwrap()
}

#[test]
fn dual_stack_vxlan_leases_devices_and_pods() {
    if !twill_lab::require_root() {
        return;
    }
    let nodes = ["n1", "n2"];
    let mut c = cluster("ds", &nodes, DUAL);
    for n in nodes {
        let (ns, idx) = (c.ns(n), c.lab.node(n).idx);
        c.lab
            .exec_ok(
                &ns,
                &[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("{}/64", v6_underlay(idx)),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )
            .unwrap();
        c.lab
            .exec_ok(&ns, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
            .unwrap();
    }
    for n in nodes {
        c.start(n, &[]);
    }
    let envs: Vec<SubnetEnv> = nodes.iter().map(|n| c.wait_ready(n)).collect();

    let mut pods = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let env = &envs[i];
        let v4 = env.subnet_network().unwrap();
        let v6 = env.ipv6_subnet_network().expect("FLANNEL_IPV6_SUBNET");
        assert_eq!(v6.prefix_len(), 64);
        assert!("fd00:42::/56"
            .parse::<ipnet::Ipv6Net>()
            .unwrap()
            .contains(&v6));
        let text = std::fs::read_to_string(c.subnet_file(n)).unwrap();
        let v4_first = std::net::Ipv4Addr::from(u32::from(v4.network()) + 1);
        let v6_first = Ipv6Addr::from(u128::from(v6.network()) + 1);
        assert_eq!(
            text,
            format!(
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={v4_first}/24\nFLANNEL_IPV6_NETWORK=fd00:42::/56\nFLANNEL_IPV6_SUBNET={v6_first}/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
            )
        );
        // The lease: Flannel's dual-stack key and value.
        let key = format!("{PREFIX}/subnets/{}-24&{}-64", v4.network(), v6.network());
        let (mac4, mac6) = (c.mac(n, "flannel.1"), c.mac(n, "flannel-v6.1"));
        let idx = c.lab.node(n).idx;
        assert_eq!(
            c.etcd_get(&key).as_deref(),
            Some(
                format!(
                    r#"{{"PublicIP":"{}","PublicIPv6":"{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac4}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}"#,
                    c.lab.node(n).addr,
                    v6_underlay(idx)
                )
                .as_str()
            ),
            "lease {key}"
        );
        let link = &c.ip_json(n, &["-d", "link", "show", "dev", "flannel-v6.1"])[0];
        // 1500 − 70: the kernel's limit for VXLAN over an IPv6 underlay.
        assert_eq!(link["mtu"], 1430);
        let info = &link["linkinfo"]["info_data"];
        let local = if info["local6"].is_null() {
            &info["local"]
        } else {
            &info["local6"]
        };
        assert_eq!(local, &v6_underlay(idx).to_string());

        // A pod with both families, set up as the bridge plugin would.
        let name = format!("d{n}");
        let ip4 = c.pod(n, &name, env);
        let pod_ns = c.lab.pod(&name).netns.clone();
        let gw6 = format!("{v6_first}");
        let ip6 = Ipv6Addr::from(u128::from(v6.network()) + 2);
        c.lab
            .exec_ok(
                &c.ns(n),
                &[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("{gw6}/64"),
                    "dev",
                    "cni0",
                    "nodad",
                ],
            )
            .unwrap();
        c.lab
            .exec_ok(
                &pod_ns,
                &[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("{ip6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )
            .unwrap();
        c.lab
            .exec_ok(
                &pod_ns,
                &["ip", "-6", "route", "add", "default", "via", &gw6],
            )
            .unwrap();
        pods.push((pod_ns, ip4, ip6, v4, v6));
    }

    // Each node programs the other over both devices.
    for (i, n) in nodes.iter().enumerate() {
        let (_, _, _, pv4, pv6) = &pods[1 - i];
        let peer = nodes[1 - i];
        let mac6 = c.mac(peer, "flannel-v6.1");
        let want_v4: Ipv4Net = *pv4;
        c.wait_entries(n, "flannel.1", "v4 peer", |e| {
            e.has_peer(&want_v4, c.lab.node(peer).addr, &c.mac(peer, "flannel.1"))
        });
        // The v6 entries may come in a later pass (or later in the same one) than the v4 ones.
        let peer_v6 = v6_underlay(c.lab.node(peer).idx);
        wait_for(&format!("v6 peer on {n}"), DEADLINE, || {
            let show = |argv: &[&str]| c.lab.exec_ok(&c.ns(n), argv).unwrap();
            let routes6 = show(&["ip", "-6", "route", "show", "dev", "flannel-v6.1"]);
            if !routes6.contains(&format!("{pv6} via {} ", pv6.network())) {
                return Err(format!("route: {routes6}"));
            }
            let neigh6 = show(&["ip", "-6", "neigh", "show", "dev", "flannel-v6.1"]);
            if !neigh6.contains(&format!("{} lladdr {mac6} PERMANENT", pv6.network())) {
                return Err(format!("neighbour: {neigh6}"));
            }
            let fdb6 = show(&["bridge", "fdb", "show", "dev", "flannel-v6.1"]);
            if !fdb6.contains(&format!("{mac6} dst {peer_v6} self permanent")) {
                return Err(format!("fdb: {fdb6}"));
            }
            Ok(())
        });
        // iptables mode (EnableNFTables absent): ip6tables holds Flannel's IPv6 chain.
        let rules6 = c
            .lab
            .exec_ok(&c.ns(n), &["ip6tables-save", "-t", "nat"])
            .unwrap();
        assert!(
            rules6.contains(
                "-A FLANNEL-POSTRTG -s fd00:42::/56 ! -d ff00::/8 -m comment --comment \"flanneld masq\" -j MASQUERADE"
            ),
            "{rules6}"
        );
        let forward6 = c
            .lab
            .exec_ok(&c.ns(n), &["ip6tables-save", "-t", "filter"])
            .unwrap();
        assert!(
            forward6.contains(
                "-A FLANNEL-FWD -d fd00:42::/56 -m comment --comment \"flanneld forward\" -j ACCEPT"
            ),
            "{forward6}"
        );
    }
    for i in 0..2 {
        let (from, ..) = &pods[i];
        let (_, to4, to6, ..) = &pods[1 - i];
        assert!(
            c.lab.wait_ping(from, IpAddr::V4(*to4), DEADLINE),
            "v4 {from} -> {to4}"
        );
        assert!(
            c.lab.wait_ping(from, IpAddr::V6(*to6), DEADLINE),
            "v6 {from} -> {to6}"
        );
    }
}
