//go:build linux

package nodelab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/netlab"
)

// libcniCache is where libcni (in cnitool) caches results; cnitool has no
// option to move it, so the cleanup removes this cluster's files.
const libcniCache = "/var/lib/cni/results"

// cniRunner runs cnitool inside a node namespace, where the bridge plugin
// builds its bridge and the pods' host-side veths.
type cniRunner struct {
	node    *Node
	cnitool string
	env     []string
	// The network names: mesh pods, other pods, loopback.
	mesh, other, lo string
}

// writeCNIConfigs writes the node's three conflists: mesh pods (bridge +
// host-local from .10-.99 + ambpf-cni), other pods (bridge + host-local
// from .100-.199; two networks sharing a bridge and an IPAM directory, so
// their addresses never collide) and loopback.
func (c *Cluster) writeCNIConfigs(n *Node) (*cniRunner, error) {
	dir := filepath.Join(n.Dir, "cni")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", dir, err)
	}
	r := &cniRunner{
		node: n, cnitool: filepath.Join(c.cfg.ToolsDir, "cnitool"),
		mesh: c.Name(n.Name + "-mesh"), other: c.Name(n.Name + "-plain"), lo: c.Name(n.Name + "-lo"),
		env: []string{"CNI_PATH=" + c.cfg.BinDir + ":" + c.cfg.ToolsDir, "NETCONFPATH=" + dir},
	}
	ipamDir := filepath.Join(n.Dir, "ipam")
	bridge := func(first, last byte) map[string]any {
		return map[string]any{
			// isDefaultGateway: the pods route everything via the node,
			// as on a real node (the replies to the probe source and to
			// other nodes need it).
			"type": "bridge", "bridge": BridgeName, "isGateway": true, "isDefaultGateway": true, "ipMasq": false,
			"ipam": map[string]any{
				"type": "host-local", "dataDir": ipamDir,
				"ranges": [][]map[string]string{{{
					"subnet": n.Subnet.String(), "gateway": n.Gateway.String(),
					"rangeStart": podAddr(n.Index, first).String(), "rangeEnd": podAddr(n.Index, last).String(),
				}}},
			},
		}
	}
	confs := map[string][]any{
		r.mesh:  {bridge(10, 99), map[string]any{"type": "ambpf-cni", "agent_socket": n.APISocket}},
		r.other: {bridge(100, 199)},
		r.lo:    {map[string]any{"type": "loopback"}},
	}
	for name, plugins := range confs {
		b, err := json.MarshalIndent(map[string]any{"cniVersion": "1.1.0", "name": name, "plugins": plugins}, "", "  ")
		if err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(dir, name+".conflist"), b, 0o644); err != nil {
			return nil, fmt.Errorf("write CNI config: %w", err)
		}
	}
	c.onCleanup(n.Name+" CNI cache files", r.removeCache)
	return r, nil
}

// MeshNetwork and PlainNetwork are the node's CNI network names.
func (n *Node) MeshNetwork() string  { return n.cni.mesh }
func (n *Node) PlainNetwork() string { return n.cni.other }

// MeshRange and PlainRange are the host-local ranges of the networks.
func (n *Node) MeshRange() string {
	return podAddr(n.Index, 10).String() + "-" + podAddr(n.Index, 99).String()
}
func (n *Node) PlainRange() string {
	return podAddr(n.Index, 100).String() + "-" + podAddr(n.Index, 199).String()
}

// run runs `cnitool <cmd> <network> <netns path>` for p.
func (r *cniRunner) run(ctx context.Context, cmd, network string, p *Pod) (string, error) {
	args := fmt.Sprintf("IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_UID=%s", p.Namespace, p.Name, p.UID)
	x := exec.CommandContext(ctx, "ip", "netns", "exec", r.node.NSName, r.cnitool, cmd, network, p.NSPath)
	x.Env = append(append(os.Environ(), r.env...), "CNI_ARGS="+args)
	out, err := x.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("cnitool %s %s for %s: %w: %s", cmd, network, p.Name, err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// removeCache removes libcni's cached results of the node's networks; a
// DEL that ran removes them itself.
func (r *cniRunner) removeCache() error {
	var errs []error
	for _, n := range []string{r.mesh, r.other, r.lo} {
		files, _ := filepath.Glob(filepath.Join(libcniCache, n+"-*"))
		for _, f := range files {
			errs = append(errs, os.Remove(f))
		}
	}
	return errors.Join(errs...)
}

// PodSpec describes a pod for AddPod.
type PodSpec struct {
	// Name is the pod's name: lowercase letters, digits and '-'.
	Name string
	// Namespace is the Kubernetes namespace it claims in CNI_ARGS; its
	// identity is spiffe://cluster.local/ns/<Namespace>/sa/default.
	Namespace string
	// Mesh chains ambpf-cni: the pod is enrolled in the mesh.
	Mesh bool
}

// Pod is a pod: a network namespace set up by CNI on a node.
type Pod struct {
	// Netns.Name is the pod's name.
	*netlab.Netns
	// Namespace and Mesh are the PodSpec's.
	Namespace string
	Mesh      bool
	Node      *Node
	// UID is the pod's UID (K8S_POD_UID): a pod created again gets a new
	// one.
	UID string
	IP  netip.Addr
	// HostVeth is eth0's peer in the node namespace, from the bridge
	// plugin's result.
	HostVeth string
	del      *undoStep
}

// Identity is the pod's SPIFFE identity.
func (p *Pod) Identity() string {
	return "spiffe://cluster.local/ns/" + p.Namespace + "/sa/default"
}

var podNamePattern = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,30}$`)

// AddPod creates the pod's namespace on node n and runs CNI ADD for it
// (loopback, then the mesh or the plain network). A mesh pod must come
// out enabled with its datapath attached. Delete (or Close) runs CNI DEL
// and deletes the namespace. A name may be used again once the pod of
// that name was deleted. Safe for concurrent use with other AddPod calls.
func (c *Cluster) AddPod(ctx context.Context, n *Node, spec PodSpec) (*Pod, error) {
	if !podNamePattern.MatchString(spec.Name) || strings.HasPrefix(spec.Name, "node") {
		return nil, fmt.Errorf("nodelab: invalid pod name %q", spec.Name)
	}
	if spec.Namespace == "" {
		return nil, fmt.Errorf("nodelab: pod %s has no namespace", spec.Name)
	}
	c.mu.Lock()
	for _, p := range c.pods {
		if p.Name == spec.Name {
			c.mu.Unlock()
			return nil, fmt.Errorf("nodelab: pod %s exists", spec.Name)
		}
	}
	c.gen[spec.Name]++
	gen := c.gen[spec.Name]
	c.mu.Unlock()
	ns, nsUndo, err := c.addNetns(spec.Name)
	if err != nil {
		return nil, err
	}
	p := &Pod{Netns: ns, Namespace: spec.Namespace, Mesh: spec.Mesh, Node: n, UID: ns.NSName}
	if gen > 1 {
		p.UID = fmt.Sprintf("%s-%d", ns.NSName, gen)
	}
	network := n.cni.other
	if spec.Mesh {
		network = n.cni.mesh
	}
	// DEL is registered before ADD: a failed ADD can leave half of the
	// chain behind, and DEL of what is not there succeeds.
	cniDel := c.onCleanup("CNI DEL "+p.Name, func() error {
		_, err := n.cni.run(context.Background(), "del", network, p)
		_, lerr := n.cni.run(context.Background(), "del", n.cni.lo, p)
		return errors.Join(err, lerr)
	})
	p.del = c.onCleanup("pod "+p.Name, func() error {
		err := errors.Join(cniDel.run(), nsUndo.run())
		c.mu.Lock()
		c.pods = slices.DeleteFunc(c.pods, func(q *Pod) bool { return q == p })
		c.mu.Unlock()
		return err
	})
	if _, err := n.cni.run(ctx, "add", n.cni.lo, p); err != nil {
		p.del.run()
		return nil, err
	}
	out, err := n.cni.run(ctx, "add", network, p)
	if err == nil {
		err = p.parseResult(out)
	}
	if err == nil && spec.Mesh {
		err = p.checkEnrolled(ctx)
	}
	if err != nil {
		p.del.run()
		return nil, err
	}
	c.mu.Lock()
	c.pods = append(c.pods, p)
	c.mu.Unlock()
	return p, nil
}

func (p *Pod) checkEnrolled(ctx context.Context) error {
	st, err := agentapi.NewClient(p.Node.APISocket).Pod(ctx, p.UID)
	if err != nil {
		return fmt.Errorf("the %s agent does not know %s after CNI ADD: %w", p.Node.Name, p.Name, err)
	}
	if st.State != agentapi.StateEnabled || st.Datapath == nil || !st.Datapath.Attached() {
		return fmt.Errorf("%s is %s after CNI ADD, datapath attached %v", p.Name, st.State, st.Datapath != nil && st.Datapath.Attached())
	}
	return nil
}

// Delete runs CNI DEL for the pod (which unenrols a mesh pod) and deletes
// its namespace.
func (p *Pod) Delete() error { return p.del.run() }

// cniResult is the part of a CNI result AddPod reads.
type cniResult struct {
	Interfaces []struct {
		Name    string `json:"name"`
		Sandbox string `json:"sandbox"`
	} `json:"interfaces"`
	IPs []struct {
		Address string `json:"address"`
	} `json:"ips"`
}

// parseResult reads the pod's address and host veth from the result the
// chain printed (ambpf-cni passes the bridge plugin's result through).
func (p *Pod) parseResult(out string) error {
	var res cniResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		return fmt.Errorf("cnitool add %s: parse result: %w\n%s", p.Name, err, out)
	}
	for _, ifc := range res.Interfaces {
		if ifc.Sandbox == "" && ifc.Name != BridgeName {
			p.HostVeth = ifc.Name
		}
	}
	for _, ip := range res.IPs {
		if pfx, err := netip.ParsePrefix(ip.Address); err == nil && pfx.Addr().Is4() {
			p.IP = pfx.Addr()
		}
	}
	if !p.IP.IsValid() || p.HostVeth == "" {
		return fmt.Errorf("cnitool add %s: result has no IPv4 address or host veth:\n%s", p.Name, out)
	}
	return nil
}

// Pods returns the pods that exist, in the order they were added.
func (c *Cluster) Pods() []*Pod {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.pods)
}

// PodNamed returns the existing pod called name, or nil.
func (c *Cluster) PodNamed(name string) *Pod {
	for _, p := range c.Pods() {
		if p.Name == name {
			return p
		}
	}
	return nil
}

// Role names an address: a pod's name, a node's name (its gateway or link
// address), "probe" for link-local sources (the probe SNAT's), else the
// address.
func (c *Cluster) Role(a netip.Addr) string {
	a = a.Unmap()
	for _, n := range c.Nodes {
		if r := n.Role(a); r != "" {
			return r
		}
	}
	for _, p := range c.Pods() {
		if p.IP == a {
			return p.Name
		}
	}
	if a.IsLinkLocalUnicast() {
		return "probe"
	}
	return a.String()
}
