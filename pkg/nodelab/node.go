//go:build linux

package nodelab

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/netlab"
)

// Node is one node: its namespace (the node's host network, holding the
// CNI bridge, the pods' host veths and the inter-node link), and the
// agent and proxy processes running in it.
type Node struct {
	// Name is "node1", "node2": the discovery file's node field, and the
	// suffix of the namespace's name.
	Name  string
	Index int
	*netlab.Netns
	// Subnet is the node's pod subnet; Gateway the bridge's address in
	// it. LinkAddr is the node's address on the inter-node link.
	Subnet   netip.Prefix
	Gateway  netip.Addr
	LinkAddr netip.Addr
	// Dir holds the node's state, sockets, logs and CNI files.
	Dir                  string
	BPFRoot              string
	APISocket, ZDSSocket string
	// CADir is the proxy's CA directory: the node's intermediate, its
	// key, the shared root.
	CADir string
	// Agent and Proxy are the running binaries; Proxy changes on
	// StartProxy.
	Agent, Proxy *netlab.Process

	c           *Cluster
	proxyCgroup string
	proxyRuns   int
	cni         *cniRunner
}

// addNode creates node i's namespace, directories and CA.
func (c *Cluster) addNode(i int) (*Node, error) {
	name := fmt.Sprintf("node%d", i+1)
	n := &Node{
		Name: name, Index: i, c: c,
		Subnet:   netip.PrefixFrom(podAddr(i, 0), 24),
		Gateway:  podAddr(i, 1),
		LinkAddr: netip.AddrFrom4([4]byte{10, 79, 0, byte(i + 1)}),
		Dir:      filepath.Join(c.cfg.Dir, name),
	}
	if err := os.Mkdir(n.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", n.Dir, err)
	}
	c.onCleanup(name+" dir", func() error { return os.RemoveAll(n.Dir) })
	n.BPFRoot = filepath.Join(c.bpffs, name)
	n.APISocket = filepath.Join(n.Dir, "agent.sock")
	n.ZDSSocket = filepath.Join(n.Dir, "zds.sock")
	n.CADir = filepath.Join(n.Dir, "ca")
	if err := c.root.writeNodeCA(n.CADir, name, int64(i+2)); err != nil {
		return nil, err
	}
	ns, _, err := c.addNetns(name)
	if err != nil {
		return nil, err
	}
	n.Netns = ns
	for _, kv := range [][2]string{{"net.ipv4.ip_forward", "1"}, {"net.ipv4.conf.all.rp_filter", "0"}} {
		if _, err := netlab.Run(exec.Command("ip", "netns", "exec", ns.NSName, "sysctl", "-qw", kv[0]+"="+kv[1])); err != nil {
			return nil, err
		}
	}
	if n.cni, err = c.writeCNIConfigs(n); err != nil {
		return nil, err
	}
	return n, nil
}

// link joins two nodes with a veth pair, LinkName in both, and routes
// each node's pod subnet to the other over it. The veth is created in a
// with its peer placed straight into b: no device ever appears in the
// caller's namespace. Deleting the namespaces removes it.
func (c *Cluster) link(a, b *Node) error {
	cmds := [][]string{
		{"ip", "-n", a.NSName, "link", "add", LinkName, "type", "veth", "peer", "name", LinkName, "netns", b.NSName},
	}
	for _, x := range []struct{ self, peer *Node }{{a, b}, {b, a}} {
		cmds = append(cmds,
			[]string{"ip", "-n", x.self.NSName, "addr", "add", x.self.LinkAddr.String() + "/30", "dev", LinkName},
			[]string{"ip", "-n", x.self.NSName, "link", "set", LinkName, "up"},
			[]string{"ip", "-n", x.self.NSName, "route", "add", x.peer.Subnet.String(), "via", x.peer.LinkAddr.String(), "dev", LinkName},
		)
	}
	for _, cmd := range cmds {
		if _, err := netlab.Run(exec.Command(cmd[0], cmd[1:]...)); err != nil {
			return fmt.Errorf("inter-node link: %w", err)
		}
	}
	return nil
}

// start starts the agent and the proxy and waits until the proxy synced.
func (n *Node) start(ctx context.Context) error {
	c := n.c
	agent, err := netlab.StartProcess(netlab.ProcessConfig{
		Name: n.Name + " agent", NetnsPath: n.NSPath, Bin: filepath.Join(c.cfg.BinDir, "ambpf-agent"),
		Args: append([]string{"--bpf-root", n.BPFRoot, "--state-dir", filepath.Join(n.Dir, "agent"),
			"--zds-socket", n.ZDSSocket, "--api-socket", n.APISocket, "--ready-addr", "off"}, c.cfg.AgentArgs...),
		LogPath: filepath.Join(n.Dir, "agent.log"), Logs: c.cfg.Logs,
	})
	if err != nil {
		return err
	}
	n.Agent = agent
	c.onCleanup(n.Name+" agent", agent.Stop)
	if err := n.waitAgent(ctx, func(agentapi.Status) bool { return true }); err != nil {
		return err
	}
	// The proxy gets a cgroup of its own, as a Kubernetes container does:
	// the agent trusts the proxy's cgroup, not its mark.
	if n.proxyCgroup, err = c.addCgroup(n.Name + "-proxy"); err != nil {
		return err
	}
	c.onCleanup(n.Name+" proxy", func() error {
		if n.Proxy == nil {
			return nil
		}
		return n.Proxy.Stop()
	})
	return n.StartProxy(ctx)
}

// StartProxy starts the node's proxy (again, after StopProxy or
// KillProxy) and waits until it has synced over ZDS.
func (n *Node) StartProxy(ctx context.Context) error {
	if n.Proxy != nil && !n.Proxy.Exited() {
		return fmt.Errorf("%s proxy still runs", n.Name)
	}
	c := n.c
	n.proxyRuns++
	p, err := netlab.StartProcess(netlab.ProcessConfig{
		Name: n.Name + " proxy", NetnsPath: n.NSPath, CgroupDir: n.proxyCgroup,
		Bin: filepath.Join(c.cfg.BinDir, "ambpf-proxy"),
		Args: append([]string{"--zds-path", n.ZDSSocket, "--state-dir", filepath.Join(n.Dir, "proxy"),
			"--ca-dir", n.CADir, "--discovery-file", c.DiscoveryFile,
			"--metrics-addr", MetricsAddr, "--ready-addr", ReadyAddr}, c.cfg.ProxyArgs...),
		LogPath: filepath.Join(n.Dir, fmt.Sprintf("proxy-%d.log", n.proxyRuns)), Logs: c.cfg.Logs,
	})
	if err != nil {
		return err
	}
	n.Proxy = p
	return n.waitAgent(ctx, func(st agentapi.Status) bool { return st.Proxy.Synced == 1 })
}

// StopProxy stops the node's proxy with SIGTERM (a rolling restart's
// first half).
func (n *Node) StopProxy() error { return n.Proxy.Stop() }

// KillProxy kills the node's proxy with SIGKILL (a crash).
func (n *Node) KillProxy() { n.Proxy.Kill() }

// Agentctl runs ambpfctl against the node's agent.
func (n *Node) Agentctl(ctx context.Context, args ...string) (string, error) {
	out, err := netlab.Run(exec.CommandContext(ctx, filepath.Join(n.c.cfg.BinDir, "ambpfctl"), append([]string{"--socket", n.APISocket}, args...)...))
	return string(out), err
}

// Role names an address of the node: "<node>" for its gateway and link
// address, "" otherwise.
func (n *Node) Role(a netip.Addr) string {
	if a == n.Gateway || a == n.LinkAddr {
		return n.Name
	}
	return ""
}

// LogTails returns the last lines of the node's agent and proxy logs.
func (n *Node) LogTails(lines int) string {
	var b strings.Builder
	for _, p := range []*netlab.Process{n.Agent, n.Proxy} {
		if p != nil {
			fmt.Fprintf(&b, "last lines of the %s log (%s):\n%s\n", p.Name(), p.LogPath(), p.Tail(lines))
		}
	}
	return b.String()
}
