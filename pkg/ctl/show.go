//go:build linux

package ctl

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/dpstate"
)

// statusJSON is `status --json`: the agent's status and its pods.
type statusJSON struct {
	Agent agentapi.Status     `json:"agent"`
	Pods  []agentapi.PodState `json:"pods"`
}

func (c *CLI) status(ctx context.Context, client *agentapi.Client, args []string) error {
	fs := c.flags("status")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := noArgs(fs); err != nil {
		return err
	}
	st, err := client.Status(ctx)
	if err != nil {
		return fmt.Errorf("status: %w", err)
	}
	pods, err := client.Pods(ctx)
	if err != nil {
		return fmt.Errorf("status: %w", err)
	}
	if *asJSON {
		return c.writeJSON(statusJSON{Agent: st, Pods: pods})
	}
	w := c.cfg.Stdout
	ready := "ready"
	if !st.Ready {
		ready = "NOT ready"
	}
	fmt.Fprintf(w, "agent:     %s\n", ready)
	fmt.Fprintf(w, "datapath:  %s mode on kernel %s; SO_REUSEPORT proxy listeners %s\n", st.Features.Mode, st.Features.Kernel,
		map[bool]string{true: "supported", false: "NOT supported (the proxy must listen without SO_REUSEPORT)"}[st.Features.ReusePortAssign])
	if st.Features.ReusePortProbeError != "" {
		fmt.Fprintf(w, "           (the SO_REUSEPORT probe failed, so taken as unsupported: %s)\n", st.Features.ReusePortProbeError)
	}
	fmt.Fprintf(w, "proxies:   %d connected, %d synced (ZDS at %s)\n", st.Proxy.Connections, st.Proxy.Synced, st.ZDSPath)
	for _, c := range st.Proxy.Cgroups {
		fmt.Fprintf(w, "  trusted proxy cgroup %d (pid %d)\n", c.ID, c.PID)
	}
	fmt.Fprintf(w, "pods:      %d enrolled, %d enabled, %d pending\n", st.Pods.Total, st.Pods.Enabled, st.Pods.Pending)
	if m := st.Memory; m != nil {
		fmt.Fprintf(w, "bpf memory: %d KiB (node %d KiB shared, pods %d KiB), %d KiB per enrolled pod\n",
			(m.NodeBytes+m.PodsBytes)>>10, m.NodeBytes>>10, m.PodsBytes>>10, m.PerPodBytes>>10)
	}
	if len(pods) == 0 {
		return nil
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "UID\tPOD\tSTATE\tNETNS\tOPTIONS")
	for _, p := range pods {
		fmt.Fprintf(tw, "%s\t%s/%s\t%s\t%s\t%s\n", p.UID, p.Namespace, p.Name, p.State, p.Netns, optionWords(p.DNSCapture, p.BypassInbound))
	}
	return tw.Flush()
}

func optionWords(dns, bypass bool) string {
	var o []string
	if dns {
		o = append(o, "dns-capture")
	}
	if bypass {
		o = append(o, "bypass-inbound")
	}
	if len(o) == 0 {
		return "-"
	}
	return strings.Join(o, ",")
}

func (c *CLI) inspect(ctx context.Context, client *agentapi.Client, reader pinReader, args []string) error {
	fs := c.flags("inspect")
	pins := fs.Bool("pins", false, "read the pins in bpffs directly instead of asking the agent (with ambpf-agent inspect-pins)")
	asJSON := fs.Bool("json", false, "print JSON")
	// Accept the UID before or after the flags.
	var uid string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		uid, args = args[0], args[1:]
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	if uid == "" && fs.NArg() > 0 {
		uid = fs.Arg(0)
		if err := noArgs(flagSetTail(fs)); err != nil {
			return err
		}
	} else if err := noArgs(fs); err != nil {
		return err
	}
	if uid == "" {
		return usagef("inspect: which pod? usage: ambpfctl inspect UID [--pins] [--json]")
	}
	if err := agentapi.ValidateUID(uid); err != nil {
		return usagef("inspect: %v", err)
	}
	var ps agentapi.PodStatus
	if *pins {
		dp, err := reader.read(ctx, uid)
		if err != nil {
			return fmt.Errorf("inspect %s: %w", uid, err)
		}
		ps.UID, ps.Datapath = uid, &dp
	} else {
		var err error
		if ps, err = client.Pod(ctx, uid); err != nil {
			return fmt.Errorf("inspect %s: %w", uid, err)
		}
	}
	if *asJSON {
		return c.writeJSON(ps)
	}
	explain(c.cfg.Stdout, ps)
	return nil
}

// flagSetTail returns a flag set holding only the arguments after the
// first positional one, to report extras.
func flagSetTail(fs *flag.FlagSet) *flag.FlagSet {
	t := flag.NewFlagSet(fs.Name(), flag.ContinueOnError)
	t.Parse(append([]string{"--"}, fs.Args()[1:]...))
	return t
}

// counterWords explains each counter in one line.
var counterWords = []struct {
	name string
	get  func(dpstate.Counters) uint64
	text string
}{
	{"captured_in", func(c dpstate.Counters) uint64 { return c.CapturedIn }, "inbound connections handed to the proxy's 15006 listener"},
	{"captured_out", func(c dpstate.Counters) uint64 { return c.CapturedOut }, "outbound connections handed to the proxy's 15001 listener"},
	{"captured_dns", func(c dpstate.Counters) uint64 { return c.CapturedDNS }, "DNS datagrams and TCP DNS connections sent to the proxy's resolver on 15053"},
	{"hbone_in", func(c dpstate.Counters) uint64 { return c.HBONEIn }, "inbound HBONE (port 15008) connections, left to the normal stack"},
	{"bypassed", func(c dpstate.Counters) uint64 { return c.Bypassed }, "connections let through uncaptured (the proxy's own, kubelet probes, bypass-inbound)"},
	{"direct", func(c dpstate.Counters) uint64 { return c.Direct }, "packets of uncaptured flows (open before attach, bypassed inbound), left direct"},
	{"dropped_no_listener", func(c dpstate.Counters) uint64 { return c.DroppedNoListener }, "captured SYNs dropped: no proxy listener (fail closed)"},
	{"dropped_no_flow", func(c dpstate.Counters) uint64 { return c.DroppedNoFlow }, "captured packets dropped: their proxy socket is gone"},
	{"assign_failed", func(c dpstate.Counters) uint64 { return c.AssignFailed }, "packets dropped because the kernel refused the socket assignment"},
	{"mark_refused", func(c dpstate.Counters) uint64 { return c.MarkRefused }, "attempts by the pod's processes to set the proxy mark, refused"},
	{"dropped_unparsed", func(c dpstate.Counters) uint64 { return c.DroppedUnparsed }, "IP packets that may carry TCP (or captured DNS) but could not be classified, dropped (fail closed)"},
	{"direct_full", func(c dpstate.Counters) uint64 { return c.DirectFull }, "bypassed inbound flows not recorded because direct_flows was full; their packets are dropped"},
	{"mark_untrusted", func(c dpstate.Counters) uint64 { return c.MarkUntrusted }, "connections carrying the proxy mark from outside the proxy's cgroup, captured anyway"},
	{"direct_entries", func(c dpstate.Counters) uint64 { return uint64(max(c.DirectEntries, 0)) }, "the pod's entries in the node's direct_flows now (a gauge; its share is bounded)"},
}

// explain prints a pod's datapath in plain words.
func explain(w io.Writer, ps agentapi.PodStatus) {
	if ps.Name != "" {
		fmt.Fprintf(w, "pod %s: %s/%s, service account %s\n", ps.UID, ps.Namespace, ps.Name, ps.ServiceAccount)
		fmt.Fprintf(w, "  state       %s, enrolled %s\n", stateWords(ps.PodState), ps.EnrolledAt.Format(time.RFC3339))
		fmt.Fprintf(w, "  netns path  %s\n", ps.Netns)
		if len(ps.IPs) > 0 {
			fmt.Fprintf(w, "  addresses   %v\n", ps.IPs)
		}
	} else {
		fmt.Fprintf(w, "pod %s (read from the pins; the agent was not asked)\n", ps.UID)
	}
	dp := ps.Datapath
	if dp == nil {
		fmt.Fprintf(w, "  datapath    not readable: %s\n", ps.DatapathError)
		return
	}
	alive := "exists"
	if !dp.NetnsAlive {
		alive = "GONE (the agent removes this pod when it next starts)"
	}
	fmt.Fprintf(w, "  netns       device %d inode %d, %s\n", dp.Netns.Dev, dp.Netns.Ino, alive)
	fmt.Fprintf(w, "  interface   %s (ifindex %d); lo carries the DNS reply program\n", dp.Interface, dp.Ifindex)
	if dp.CgroupID != 0 {
		fmt.Fprintf(w, "  cgroup      id %d: the mark guard refuses the proxy mark to the pod's processes\n", dp.CgroupID)
	} else {
		fmt.Fprintf(w, "  cgroup      none given: no mark guard, a process with CAP_NET_RAW could set the proxy mark and leave the mesh\n")
	}
	fmt.Fprintf(w, "  options     DNS capture %s, inbound capture %s\n", onOff(dp.Options.DNSCapture), onOff(!dp.Options.BypassInbound))
	mode := "tcx links: pinned, chained safely with other programs, replaced atomically"
	if dp.Mode != "tcx" {
		mode = "clsact filters with ambpf's own priority and handle, replaced atomically"
	}
	fmt.Fprintf(w, "  mode        %s (%s)\n", dp.Mode, mode)
	build := "this agent's build"
	if !dp.Current {
		build = "an OLDER build: the agent upgrades it on start"
	}
	fmt.Fprintf(w, "  programs    build %s, %s; attached %s\n", dp.ProgramTag, build, dp.AttachedAt.Format(time.RFC3339))
	fmt.Fprintf(w, "  pins        %s\n", dp.PinDir)
	fmt.Fprintf(w, "  index       %d: the pod's key in the node's maps (node/pod_config, pod_counters, pod_meta); "+
		"its entry programs hand it to the node's shared capture programs\n", dp.Index)
	fmt.Fprintf(w, "  attachments (bpftool prog show id N / bpftool link show id N):\n")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, a := range dp.Attachments {
		state := "attached"
		if !a.Attached {
			state = "NOT ATTACHED"
		}
		link := "-"
		if a.LinkID != 0 {
			link = fmt.Sprint(a.LinkID)
		}
		fmt.Fprintf(tw, "    %s\tprogram %s\tprog id %d\tlink id %s\tpin %s\t%s\n", a.Hook, a.Program, a.ProgramID, link, a.Pin, state)
	}
	tw.Flush()
	fmt.Fprintf(w, "  counters:\n")
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, cw := range counterWords {
		fmt.Fprintf(tw, "    %s\t%d\t%s\n", cw.name, cw.get(dp.Counters), cw.text)
	}
	tw.Flush()
	explainFastPath(w, ps.FastPath)
}

// explainFastPath prints the pod's in-pod fast path (pkg/fastpath), when
// the agent runs it.
func explainFastPath(w io.Writer, fp *dpstate.FastPath) {
	if fp == nil {
		fmt.Fprintf(w, "  fast path   off (agent --fastpath)\n")
		return
	}
	if !fp.Attached && fp.Disabled != "" && fp.Error == "" {
		fmt.Fprintf(w, "  fast path   mode %s, off for this pod: %s\n", fp.Mode, fp.Disabled)
		return
	}
	if !fp.Attached {
		fmt.Fprintf(w, "  fast path   mode %s but NOT attached to this pod: its in-pod leg takes TCP (%s)\n", fp.Mode, fp.Error)
		return
	}
	fmt.Fprintf(w, "  fast path   mode %s, attached (fastpath/fp_stats[%d]):\n", fp.Mode, fp.Index)
	c := fp.Counters
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, r := range []struct {
		name string
		v    uint64
		text string
	}{
		{"app_sockets", c.AppSockets, "app sockets recorded (connect completed)"},
		{"paired", c.Paired, "proxy sockets recorded as an app socket's peer"},
		{"msgs_to_proxy", c.MsgsToProxy, "sendmsg calls moved app -> proxy outside TCP"},
		{"bytes_to_proxy", c.BytesToProxy, ""},
		{"msgs_to_app", c.MsgsToApp, "proxy -> app (mode both)"},
		{"bytes_to_app", c.BytesToApp, ""},
		{"fallback", c.Fallback, "sockets that went (on) through TCP: no peer yet, or it was gone"},
		{"full", c.Full, "sockets not recorded: a map was full"},
	} {
		fmt.Fprintf(tw, "    %s\t%d\t%s\n", r.name, r.v, r.text)
	}
	tw.Flush()
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}
