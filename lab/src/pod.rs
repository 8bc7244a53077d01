//! Pods: network namespaces attached to a node by hand (a veth pair on the node's `cni0`),
//! through a CNI plugin (ADD on creation, DEL on removal) or by the caller.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{run, Ipv4Net, Lab, Node, CNI_PLUGIN_DIR, POD_BRIDGE};

/// What a CNI plugin was called with and returned for a pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniAttachment {
    /// The plugin binary that was executed.
    pub bin: PathBuf,
    /// The network configuration passed on stdin.
    pub netconf: String,
    /// The `CNI_CONTAINERID` used (needed for DEL).
    pub container_id: String,
    /// The plugin's result (parsed stdout of ADD).
    pub result: serde_json::Value,
}

/// A pod: a network namespace whose `eth0` is attached to a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pod {
    /// Short name given when it was added.
    pub name: String,
    /// Full network namespace name (`<prefix><name>`).
    pub netns: String,
    /// Short name of the node it is attached to.
    pub node: String,
    /// Its IPv4 address with prefix length.
    pub addr: Ipv4Net,
    /// Interface inside the pod (`eth0`).
    pub ifname: String,
    /// Host side of the veth pair, inside the node (manual pods only).
    pub host_veth: Option<String>,
    /// Set for pods added through a CNI plugin.
    pub cni: Option<CniAttachment>,
}

impl Pod {
    /// The pod's IPv4 address without prefix length.
    pub fn ip(&self) -> Ipv4Addr {
        self.addr.addr()
    }
}

impl Lab {
    fn new_pod_ns(&mut self, pod: &str) -> Result<String> {
        let ns = self.ns(pod);
        run::ip(&["netns", "add", &ns])?;
        if let Err(e) = run::ip_batch(&ns, &["link set lo up".into()]) {
            let _ = run::ip(&["netns", "del", &ns]);
            return Err(e);
        }
        Ok(ns)
    }

    /// Adds a pod without CNI: namespace `<prefix><pod>`; in the node, bridge `cni0` with the
    /// gateway (first address of `addr`'s network) if absent, as the bridge plugin does with
    /// `isGateway`; a veth pair (host side `vp<n>` in the node, on `cni0`; `eth0` in the pod with
    /// `addr`) and a default route via the gateway. Routes between nodes are the caller's job.
    pub fn add_manual_pod(&mut self, node: &str, pod: &str, addr: Ipv4Net) -> Result<Pod> {
        self.check_new_ns_name("pod", pod)?;
        let node = self.node_checked(node)?;
        let gw = addr
            .hosts()
            .next()
            .ok_or_else(|| anyhow!("{addr}: network too small for a gateway"))?;
        if gw == addr.addr() {
            bail!("{addr}: pod address is the gateway address");
        }
        let gw_net = Ipv4Net::new(gw, addr.prefix_len())?;
        let host_veth = format!("vp{}", self.next_pod);
        self.next_pod += 1;
        let has_bridge = self
            .exec(&node.netns, &["ip", "link", "show", POD_BRIDGE])?
            .status
            .success();
        let mut lines = Vec::new();
        if !has_bridge {
            lines.push(format!("link add {POD_BRIDGE} type bridge"));
        }
        lines.push(format!("addr replace {gw_net} dev {POD_BRIDGE}"));
        lines.push(format!("link set {POD_BRIDGE} up"));
        run::ip_batch(&node.netns, &lines)?;
        let ns = self.new_pod_ns(pod)?;
        let res = run::ip_batch(
            &node.netns,
            &[
                format!("link add {host_veth} type veth peer name eth0 netns {ns}"),
                format!("link set {host_veth} master {POD_BRIDGE} up"),
            ],
        )
        .and_then(|()| {
            run::ip_batch(
                &ns,
                &[
                    format!("addr add {addr} dev eth0"),
                    "link set eth0 up".into(),
                    format!("route add default via {gw} dev eth0"),
                ],
            )
        });
        if let Err(e) = res {
            let _ = run::ip(&["netns", "del", &ns]);
            let _ = run::ip_batch(&node.netns, &[format!("link del {host_veth}")]);
            return Err(e);
        }
        Ok(self.record_pod(pod, ns, &node, addr, Some(host_veth), None))
    }

    /// Records a pod whose namespace `netns` is attached to `node` (its `eth0` holds `addr`)
    /// and returns it: the one place a pod joins the lab's list.
    fn record_pod(
        &mut self,
        name: &str,
        netns: String,
        node: &Node,
        addr: Ipv4Net,
        host_veth: Option<String>,
        cni: Option<CniAttachment>,
    ) -> Pod {
        let p = Pod {
            name: name.to_string(),
            netns,
            node: node.name.clone(),
            addr,
            ifname: "eth0".into(),
            host_veth,
            cni,
        };
        self.pods.push(p.clone());
        p
    }

    fn cni_invoke(&self, command: &str, call: CniCall<'_>) -> Result<Vec<u8>> {
        let CniCall {
            node_ns,
            pod,
            pod_ns,
            container_id,
            bin,
            netconf,
        } = call;
        let mut cni_path = CNI_PLUGIN_DIR.to_string();
        if let Some(dir) = bin.parent().filter(|d| !d.as_os_str().is_empty()) {
            cni_path = format!("{}:{cni_path}", dir.display());
        }
        let what = format!("CNI {command} {} for {pod} in {node_ns}", bin.display());
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", node_ns])
            .arg(bin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", format!("/run/netns/{pod_ns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", cni_path)
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}"),
            );
        let out = run::run(
            cmd,
            &what,
            Some(netconf.as_bytes()),
            Some(Duration::from_secs(60)),
        )?;
        Ok(run::check(&what, out)?.stdout)
    }

    /// Adds a pod through a CNI plugin: creates namespace `<prefix><pod>` and runs `cni_bin`
    /// inside the node's namespace with `CNI_COMMAND=ADD`, a unique `CNI_CONTAINERID`,
    /// `CNI_NETNS=/run/netns/<podns>`, `CNI_IFNAME=eth0`,
    /// `CNI_PATH=<dir of cni_bin>:/usr/lib/cni`, `CNI_ARGS` with `K8S_POD_NAME=<pod>`, and
    /// `netconf_json` on stdin. The pod's address is the first IPv4 address of the result.
    /// Put IPAM state under the node's directory (`"dataDir"`) so teardown removes it.
    pub fn add_cni_pod(
        &mut self,
        node: &str,
        pod: &str,
        cni_bin: &Path,
        netconf_json: &str,
    ) -> Result<Pod> {
        self.check_new_ns_name("pod", pod)?;
        let node = self.node_checked(node)?;
        let ns = self.new_pod_ns(pod)?;
        let container_id = format!("{}{}", self.prefix, pod);
        let res = self
            .cni_invoke(
                "ADD",
                CniCall {
                    node_ns: &node.netns,
                    pod,
                    pod_ns: &ns,
                    container_id: &container_id,
                    bin: cni_bin,
                    netconf: netconf_json,
                },
            )
            .and_then(|stdout| {
                let result: serde_json::Value =
                    serde_json::from_slice(&stdout).with_context(|| {
                        format!(
                            "CNI ADD result is not JSON: {}",
                            String::from_utf8_lossy(&stdout)
                        )
                    })?;
                let addr = cni_result_ipv4(&result)
                    .ok_or_else(|| anyhow!("no IPv4 address in CNI result {result}"))?;
                Ok((result, addr))
            });
        let (result, addr) = match res {
            Ok(v) => v,
            Err(e) => {
                let _ = run::ip(&["netns", "del", &ns]);
                return Err(e);
            }
        };
        let cni = CniAttachment {
            bin: cni_bin.to_path_buf(),
            netconf: netconf_json.to_string(),
            container_id,
            result,
        };
        Ok(self.record_pod(pod, ns, &node, addr, None, Some(cni)))
    }

    /// Adds a pod whose network the caller attaches (with a CNI runtime of its own, say):
    /// creates namespace `<prefix><pod>` with `lo` up and calls `attach` with its full name;
    /// `attach` returns the pod's address. The namespace is removed again if `attach` fails.
    /// [`Lab::del_pod`] only deletes the namespace of such a pod: detaching is the caller's job.
    pub fn add_attached_pod(
        &mut self,
        node: &str,
        pod: &str,
        attach: impl FnOnce(&str) -> Result<Ipv4Net>,
    ) -> Result<Pod> {
        self.check_new_ns_name("pod", pod)?;
        let node = self.node_checked(node)?;
        let ns = self.new_pod_ns(pod)?;
        let addr = match attach(&ns) {
            Ok(a) => a,
            Err(e) => {
                let _ = run::ip(&["netns", "del", &ns]);
                return Err(e);
            }
        };
        Ok(self.record_pod(pod, ns, &node, addr, None, None))
    }

    /// Removes a pod. For a CNI pod, first runs the plugin with `CNI_COMMAND=DEL` (same config,
    /// with `prevResult` added as the CNI spec asks); then deletes the pod's namespace (and for a
    /// manual pod the host-side veth). The pod is forgotten even if DEL failed; the error is returned.
    pub fn del_pod(&mut self, pod: &str) -> Result<()> {
        let i = self.pod_index(pod)?;
        let p = self.pods.remove(i);
        let mut errs = Vec::new();
        if let Some(cni) = &p.cni {
            let conf = with_prev_result(&cni.netconf, &cni.result);
            if let Err(e) = self.cni_del(&p, &cni.bin, &conf) {
                errs.push(format!("{e:#}"));
            }
        }
        if let Err(e) = self.remove_pod_netns(&p) {
            errs.push(format!("{e:#}"));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            bail!(errs.join("; "))
        }
    }

    /// Removes a CNI pod with a plugin other than the one that added it: runs `bin` with
    /// `CNI_COMMAND=DEL` and `netconf` (e.g. the bridge plugin with the delegate config
    /// Flannel's plugin saved, which is what Flannel's plugin does for a pod twill-cni added),
    /// then deletes the pod's namespace. If DEL fails the pod stays, as it was.
    pub fn del_cni_pod_with(&mut self, pod: &str, bin: &Path, netconf: &str) -> Result<()> {
        let i = self.pod_index(pod)?;
        if self.pods[i].cni.is_none() {
            bail!("pod {pod} was not added through CNI");
        }
        self.cni_del(&self.pods[i], bin, netconf)?;
        let p = self.pods.remove(i);
        self.remove_pod_netns(&p)
    }

    fn pod_index(&self, pod: &str) -> Result<usize> {
        self.pods
            .iter()
            .position(|p| p.name == pod)
            .ok_or_else(|| anyhow!("lab {} has no pod {pod:?}", self.prefix))
    }

    /// Runs `bin` with `CNI_COMMAND=DEL` and `netconf` for a pod added through CNI (with the
    /// container id of its ADD).
    fn cni_del(&self, p: &Pod, bin: &Path, netconf: &str) -> Result<()> {
        let cni = p
            .cni
            .as_ref()
            .ok_or_else(|| anyhow!("pod {} was not added through CNI", p.name))?;
        self.cni_invoke(
            "DEL",
            CniCall {
                node_ns: &self.ns(&p.node),
                pod: &p.name,
                pod_ns: &p.netns,
                container_id: &cni.container_id,
                bin,
                netconf,
            },
        )
        .map(|_| ())
    }

    /// Deletes a pod's namespace and, for a manual pod, the host side of its veth pair.
    fn remove_pod_netns(&self, p: &Pod) -> Result<()> {
        let deleted = run::ip(&["netns", "del", &p.netns]).map(|_| ());
        if let Some(v) = &p.host_veth {
            // Usually gone with the pod's end already.
            let _ = run::ip_batch(&self.ns(&p.node), &[format!("link del {v}")]);
        }
        deleted
    }
}

/// Arguments of one CNI plugin invocation.
struct CniCall<'a> {
    node_ns: &'a str,
    pod: &'a str,
    pod_ns: &'a str,
    container_id: &'a str,
    bin: &'a Path,
    netconf: &'a str,
}

/// First IPv4 address (with prefix length) in a CNI result: `ips[].address` (CNI ≥ 0.3) or
/// `ip4.ip` (CNI 0.2).
pub fn cni_result_ipv4(result: &serde_json::Value) -> Option<Ipv4Net> {
    let from_ips = result
        .get("ips")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str()?.parse::<Ipv4Net>().ok())
        .next();
    from_ips.or_else(|| result.get("ip4")?.get("ip")?.as_str()?.parse().ok())
}

/// `netconf` with `prevResult` set to `result` (for DEL), or `netconf` unchanged if it is not a
/// JSON object.
fn with_prev_result(netconf: &str, result: &serde_json::Value) -> String {
    match serde_json::from_str::<serde_json::Value>(netconf) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.insert("prevResult".into(), result.clone());
            serde_json::Value::Object(m).to_string()
        }
        _ => netconf.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_results() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","ips":[{"address":"fd00::2/64"},{"address":"10.244.1.2/24","gateway":"10.244.1.1"}]}"#,
        )
        .unwrap();
        assert_eq!(cni_result_ipv4(&v), Some("10.244.1.2/24".parse().unwrap()));
        let v: serde_json::Value =
            serde_json::from_str(r#"{"cniVersion":"0.2.0","ip4":{"ip":"10.1.0.5/16"}}"#).unwrap();
        assert_eq!(cni_result_ipv4(&v), Some("10.1.0.5/16".parse().unwrap()));
        assert_eq!(cni_result_ipv4(&serde_json::json!({})), None);
    }

    #[test]
    fn prev_result_is_added() {
        let s = with_prev_result(r#"{"type":"bridge"}"#, &serde_json::json!({"ips":[]}));
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["prevResult"], serde_json::json!({"ips":[]}));
        assert_eq!(with_prev_result("nope", &serde_json::json!({})), "nope");
    }
}
