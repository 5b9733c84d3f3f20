//go:build linux

package demo

import (
	"context"
	"fmt"
	"net/netip"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/nodelab"
)

// pod is a demo pod: a netns set up by CNI on a node, running the
// greeter.
type pod struct {
	*nodelab.Pod
	app *greeter
}

// addPods creates the pods through CNI on their nodes, writes the shared
// discovery file that tells each proxy about the other node's mesh pods,
// and starts the apps.
func (d *demo) addPods(ctx context.Context) error {
	for _, n := range d.cluster.Nodes {
		d.printf("  %s CNI networks %s (bridge, host-local %s, ambpf-cni) and %s (bridge, host-local %s)\n",
			n.Name, n.MeshNetwork(), n.MeshRange(), n.PlainNetwork(), n.PlainRange())
	}
	for _, spec := range []struct {
		node *nodelab.Node
		name string
		mesh bool
	}{{d.n1, podA, true}, {d.n1, podB, true}, {d.n1, podOutside, false}, {d.n2, podC, true}} {
		np, err := d.cluster.AddPod(ctx, spec.node, nodelab.PodSpec{Name: spec.name, Namespace: k8sNamespace, Mesh: spec.mesh})
		if err != nil {
			return err
		}
		p := &pod{Pod: np}
		d.pods = append(d.pods, p)
		state := "not in the mesh"
		if p.Mesh {
			st, err := agentapi.NewClient(p.Node.APISocket).Pod(ctx, p.UID)
			if err != nil {
				return fmt.Errorf("the %s agent does not know %s after CNI ADD: %w", p.Node.Name, p.Name, err)
			}
			attached := st.Datapath != nil && st.Datapath.Attached()
			state = fmt.Sprintf("enrolled by ambpf-cni: %s, datapath attached %v", st.State, attached)
			d.check(st.State == agentapi.StateEnabled && attached, p.Name+" is not enabled with its datapath attached")
		}
		d.printf("  pod %-8s on %s  netns %s  eth0 %s  host veth %s  %s\n", p.Name, p.Node.Name, p.NSName, p.IP, p.HostVeth, state)
		g, err := startGreeter(p.Netns, p.Name)
		if err != nil {
			return err
		}
		p.app = g
		d.onCleanup("app "+p.Name, g.Close)
	}
	d.printf("  app servers on [::]:%d in every pod, answering \"app=<pod> peer=<address the app saw>\"\n", appPort)
	if err := d.cluster.WriteDiscovery(""); err != nil {
		return err
	}
	d.printf("  discovery file written (every mesh pod with its node) and loaded by both proxies\n")
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

// role names an address: a pod, a node (gateway or link address), the
// probe source.
func (d *demo) role(a netip.Addr) string { return d.cluster.Role(a) }
