//go:build linux

package agent

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/nlretry"
	"github.com/ambpf/ambpf/pkg/probesnat"
)

// Kubelet probes: Istio ambient SNATs the node's own connections to an
// enrolled pod to 169.254.7.127 with a host iptables rule, and the in-pod
// rules let that source through uncaptured. The agent does the same with
// pkg/probesnat on the pod's host-side veth (the peer of its eth0, in the
// node namespace): attached on enrol, detached on unenrol, reconciled on
// start. The pins are the state, as for the datapath.

// hostVeth is the node-side end of a pod's veth.
type hostVeth struct {
	name    string
	ifindex int
}

// errNoHostVeth: the pod's interface has no peer in the node namespace
// (not a veth): there is nothing to attach the probe SNAT to.
var errNoHostVeth = errors.New("the pod's interface is not a veth")

// openProbes opens the node namespace and the probe SNAT loader, unless
// probe SNAT is disabled (then both are nil).
func openProbes(cfg Config) (*netns.NS, *probesnat.Loader, error) {
	if cfg.NoProbeSNAT {
		return nil, nil, nil
	}
	var (
		ns  *netns.NS
		err error
	)
	if cfg.NodeNetns == "" {
		ns, err = netns.Current()
	} else {
		ns, err = netns.Open(cfg.NodeNetns)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("node netns: %w", err)
	}
	l, err := probesnat.New(probesnat.Config{Root: cfg.BPFRoot, Netns: ns, Mode: cfg.Mode, Logger: cfg.Logger})
	if err != nil {
		ns.Close()
		return nil, nil, fmt.Errorf("probe snat: %w", err)
	}
	return ns, l, nil
}

// closeProbes releases the loader and the node namespace; the pins stay.
func (a *Agent) closeProbes() error {
	if a.probes == nil {
		return nil
	}
	return errors.Join(a.probes.Close(), a.nodeNS.Close())
}

// findHostVeth returns the node-side peer of ifname in the pod namespace:
// eth0's IFLA_LINK is its peer's ifindex in the peer's namespace, and the
// device with that index in the node namespace is the peer only if it is
// a veth pointing back at eth0 from another namespace (an index alone can
// name an unrelated device when the peer lives elsewhere).
func (a *Agent) findHostVeth(pod *netns.NS, ifname string) (hostVeth, error) {
	if ifname == "" {
		ifname = datapath.DefaultInterface
	}
	var podIndex, peerIndex int
	err := pod.Do(func() error {
		lk, err := nlretry.LinkByName(ifname)
		if err != nil {
			return fmt.Errorf("find %s in the pod: %w", ifname, err)
		}
		if _, ok := lk.(*netlink.Veth); !ok {
			return fmt.Errorf("%s is a %s: %w", ifname, lk.Type(), errNoHostVeth)
		}
		podIndex, peerIndex = lk.Attrs().Index, lk.Attrs().ParentIndex
		return nil
	})
	if err != nil {
		return hostVeth{}, err
	}
	var hv hostVeth
	err = a.nodeNS.Do(func() error {
		lk, err := netlink.LinkByIndex(peerIndex)
		if err != nil {
			return fmt.Errorf("find the peer of the pod's %s (ifindex %d) in the node netns: %w", ifname, peerIndex, err)
		}
		at := lk.Attrs()
		if _, ok := lk.(*netlink.Veth); !ok || at.ParentIndex != podIndex || at.NetNsID < 0 {
			return fmt.Errorf("the peer of the pod's %s (ifindex %d) is not in the node netns (found %s, a %s)",
				ifname, peerIndex, at.Name, lk.Type())
		}
		hv = hostVeth{name: at.Name, ifindex: at.Index}
		return nil
	})
	return hv, err
}

// attachProbes attaches the probe SNAT to the pod's host-side veth and
// records it. A pod whose interface is not a veth is enrolled without it
// (logged). It is a no-op when probe SNAT is disabled.
func (a *Agent) attachProbes(st agentapi.PodState, pod *netns.NS) error {
	if a.probes == nil {
		return nil
	}
	hv, err := a.findHostVeth(pod, st.Interface)
	if errors.Is(err, errNoHostVeth) {
		a.podLog(st).Warn("no probe snat: kubelet probes to this pod will be captured", "reason", err)
		return nil
	}
	if err != nil {
		return fmt.Errorf("probe snat: %w", err)
	}
	if _, err := a.probes.Attach(hv.name); err != nil {
		return fmt.Errorf("probe snat: %w", err)
	}
	a.mu.Lock()
	a.veths[st.UID] = hv
	a.mu.Unlock()
	a.podLog(st).Debug("probe snat attached", "host_veth", hv.name)
	return nil
}

// detachProbes removes the probe SNAT of uid's host veth, if the agent
// attached one and the device is still the same one.
func (a *Agent) detachProbes(uid string) error {
	if a.probes == nil {
		return nil
	}
	a.mu.Lock()
	hv, ok := a.veths[uid]
	delete(a.veths, uid)
	a.mu.Unlock()
	if !ok {
		return nil
	}
	st, err := a.probes.Get(hv.name)
	switch {
	case errors.Is(err, probesnat.ErrNotAttached):
		return nil
	case err != nil:
		return fmt.Errorf("probe snat of %s: %w", hv.name, err)
	case int(st.Ifindex) != hv.ifindex:
		// The name now belongs to another pod's veth: not ours to remove.
		return nil
	}
	if err := a.probes.Detach(hv.name); err != nil && !errors.Is(err, probesnat.ErrNotAttached) {
		return fmt.Errorf("probe snat: %w", err)
	}
	return nil
}

// reconcileProbes makes the probe SNAT pins match the pods after the
// datapath was reconciled: leftovers of gone devices and unfinished
// attaches are pruned, every pod gets its translation (attached again when
// missing), and translations on node devices of no known pod are removed.
// Failures are logged: a pod stays enrolled without probe SNAT rather
// than being dropped on start.
func (a *Agent) reconcileProbes(pods map[string]agentapi.PodState) {
	if a.probes == nil {
		return
	}
	if removed, err := a.probes.Prune(); err != nil {
		a.log.Warn("probe snat prune", "err", err, "removed", removed)
	}
	wanted := map[string]bool{}
	for _, p := range pods {
		ns, err := a.openPodNetns(p)
		if err != nil {
			continue // the datapath reconcile dropped or will drop it
		}
		err = a.attachProbes(p, ns)
		ns.Close()
		if err != nil {
			a.podLog(p).Warn("probe snat not reconciled", "err", err)
			continue
		}
		a.mu.Lock()
		if hv, ok := a.veths[p.UID]; ok {
			wanted[hv.name] = true
		}
		a.mu.Unlock()
	}
	all, err := a.probes.List()
	if err != nil {
		a.log.Warn("probe snat list", "err", err)
		return
	}
	nodeID, err := a.nodeNS.ID()
	if err != nil {
		a.log.Warn("probe snat: node netns identity", "err", err)
		return
	}
	for _, st := range all {
		if wanted[st.Interface] || st.Netns != nodeID {
			continue
		}
		a.log.Info("detaching probe snat of a device no known pod uses", "interface", st.Interface)
		if err := a.probes.Detach(st.Interface); err != nil && !errors.Is(err, probesnat.ErrNotAttached) {
			a.log.Warn("probe snat detach", "interface", st.Interface, "err", err)
		}
	}
}
