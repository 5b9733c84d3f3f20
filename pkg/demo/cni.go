//go:build linux

package demo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/netlab"
)

// The pod network: one bridge in the node netns, the mesh pods and the
// others in two ranges of one subnet (two CNI networks sharing a bridge
// and an IPAM directory, so their addresses never collide).
var (
	podSubnet  = netip.MustParsePrefix("10.78.0.0/24")
	gatewayV4  = netip.MustParseAddr("10.78.0.1")
	meshRange  = [2]string{"10.78.0.10", "10.78.0.99"}
	otherRange = [2]string{"10.78.0.100", "10.78.0.199"}
)

const (
	bridgeName = "cni0"
	// libcniCache is where libcni (in cnitool) caches results; cnitool
	// has no option to move it, so the cleanup removes this run's files.
	libcniCache = "/var/lib/cni/results"
)

// pod is a demo pod: a netns set up by CNI.
type pod struct {
	*netlab.Netns
	uid      string
	mesh     bool
	ip       netip.Addr
	hostVeth string // eth0's peer in the node netns, from the bridge plugin's result
	app      *greeter
}

// cniRunner runs cnitool inside the node namespace, where the bridge
// plugin builds its bridge and the pods' host-side veths.
type cniRunner struct {
	node    *netlab.Netns
	cnitool string
	env     []string
	// nets are the network names: mesh pods, other pods, loopback.
	mesh, other, lo string
}

// writeConfigs writes the three conflists of this run.
func (d *demo) writeConfigs() (*cniRunner, error) {
	dir := filepath.Join(d.runDir, "cni")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", dir, err)
	}
	c := &cniRunner{
		node: d.node, cnitool: filepath.Join(d.cfg.ToolsDir, "cnitool"),
		mesh: d.name("mesh"), other: d.name("plain"), lo: d.name("lo"),
		env: []string{"CNI_PATH=" + d.cfg.BinDir + ":" + d.cfg.ToolsDir, "NETCONFPATH=" + dir},
	}
	ipamDir := filepath.Join(d.runDir, "ipam")
	bridge := func(r [2]string) map[string]any {
		return map[string]any{
			// isDefaultGateway: the pods route everything via the node,
			// as on a real node (the replies to the probe source need it).
			"type": "bridge", "bridge": bridgeName, "isGateway": true, "isDefaultGateway": true, "ipMasq": false,
			"ipam": map[string]any{
				"type": "host-local", "dataDir": ipamDir,
				"ranges": [][]map[string]string{{{"subnet": podSubnet.String(), "rangeStart": r[0], "rangeEnd": r[1], "gateway": gatewayV4.String()}}},
			},
		}
	}
	confs := map[string][]any{
		c.mesh:  {bridge(meshRange), map[string]any{"type": "ambpf-cni", "agent_socket": d.apiSocket()}},
		c.other: {bridge(otherRange)},
		c.lo:    {map[string]any{"type": "loopback"}},
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
	d.onCleanup("CNI cache files", c.removeCache)
	return c, nil
}

// run runs `cnitool <cmd> <network> <netns path>` for p.
func (c *cniRunner) run(ctx context.Context, cmd, network string, p *pod) (string, error) {
	args := fmt.Sprintf("IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_UID=%s", k8sNamespace, p.Name, p.uid)
	x := exec.CommandContext(ctx, "ip", "netns", "exec", c.node.NSName, c.cnitool, cmd, network, p.NSPath)
	x.Env = append(append(os.Environ(), c.env...), "CNI_ARGS="+args)
	out, err := x.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("cnitool %s %s for %s: %w: %s", cmd, network, p.Name, err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// removeCache removes libcni's cached results of this run's networks; a
// DEL that ran removes them itself.
func (c *cniRunner) removeCache() error {
	var errs []error
	for _, n := range []string{c.mesh, c.other, c.lo} {
		files, _ := filepath.Glob(filepath.Join(libcniCache, n+"-*"))
		for _, f := range files {
			errs = append(errs, os.Remove(f))
		}
	}
	return errors.Join(errs...)
}

// cniResult is the part of a CNI result the demo reads.
type cniResult struct {
	Interfaces []struct {
		Name    string `json:"name"`
		Sandbox string `json:"sandbox"`
	} `json:"interfaces"`
	IPs []struct {
		Address string `json:"address"`
	} `json:"ips"`
}

// addPods creates the pods' namespaces, runs CNI ADD for each and starts
// their apps.
func (d *demo) addPods(ctx context.Context) error {
	c, err := d.writeConfigs()
	if err != nil {
		return err
	}
	d.cni = c
	d.printf("  CNI networks %s (bridge, host-local %s-%s, ambpf-cni) and %s (bridge, host-local %s-%s)\n",
		c.mesh, meshRange[0], meshRange[1], c.other, otherRange[0], otherRange[1])
	for _, spec := range []struct {
		name string
		mesh bool
	}{{podA, true}, {podB, true}, {podOutside, false}} {
		ns, err := d.addNetns(spec.name)
		if err != nil {
			return err
		}
		p := &pod{Netns: ns, uid: d.name(spec.name), mesh: spec.mesh}
		network := c.other
		if p.mesh {
			network = c.mesh
		}
		// DEL is registered before ADD: a failed ADD can leave half of
		// the chain behind, and DEL of what is not there succeeds.
		d.onCleanup("CNI DEL "+p.Name, func() error {
			_, err := c.run(context.Background(), "del", network, p)
			_, lerr := c.run(context.Background(), "del", c.lo, p)
			return errors.Join(err, lerr)
		})
		if _, err := c.run(ctx, "add", c.lo, p); err != nil {
			return err
		}
		out, err := c.run(ctx, "add", network, p)
		if err != nil {
			return err
		}
		if err := p.parseResult(out); err != nil {
			return fmt.Errorf("cnitool add %s: %w", p.Name, err)
		}
		d.pods = append(d.pods, p)
		state := "not in the mesh"
		if p.mesh {
			st, err := agentapi.NewClient(d.apiSocket()).Pod(ctx, p.uid)
			if err != nil {
				return fmt.Errorf("the agent does not know %s after CNI ADD: %w", p.Name, err)
			}
			attached := st.Datapath != nil && st.Datapath.Attached()
			state = fmt.Sprintf("enrolled by ambpf-cni: %s, datapath attached %v", st.State, attached)
			d.check(st.State == agentapi.StateEnabled && attached, p.Name+" is not enabled with its datapath attached")
		}
		d.printf("  pod %-8s netns %s  eth0 %s  host veth %s  %s\n", p.Name, p.NSName, p.ip, p.hostVeth, state)
		g, err := startGreeter(p.Netns, p.Name)
		if err != nil {
			return err
		}
		p.app = g
		d.onCleanup("app "+p.Name, g.Close)
	}
	d.printf("  app servers on [::]:%d in every pod, answering \"app=<pod> peer=<address the app saw>\"\n", appPort)
	return nil
}

// parseResult reads the pod's address and host veth from the result the
// chain printed (ambpf-cni passes the bridge plugin's result through).
func (p *pod) parseResult(out string) error {
	var res cniResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		return fmt.Errorf("parse result: %w\n%s", err, out)
	}
	for _, ifc := range res.Interfaces {
		if ifc.Sandbox == "" && ifc.Name != bridgeName {
			p.hostVeth = ifc.Name
		}
	}
	for _, ip := range res.IPs {
		if pfx, err := netip.ParsePrefix(ip.Address); err == nil && pfx.Addr().Is4() {
			p.ip = pfx.Addr()
		}
	}
	if !p.ip.IsValid() || p.hostVeth == "" {
		return fmt.Errorf("result has no IPv4 address or host veth:\n%s", out)
	}
	return nil
}

// podNamed returns the pod called name.
func (d *demo) podNamed(name string) *pod {
	for _, p := range d.pods {
		if p.Name == name {
			return p
		}
	}
	return nil
}

// role names an address: a pod, the node (gateway), the probe source.
func (d *demo) role(a netip.Addr) string {
	a = a.Unmap()
	if a == gatewayV4 {
		return "node"
	}
	for _, p := range d.pods {
		if p.ip == a {
			return p.Name
		}
	}
	if a.IsLinkLocalUnicast() {
		return "probe"
	}
	return a.String()
}
