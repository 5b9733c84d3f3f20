//go:build linux

// Package ctl is ambpfctl, the operator's command line for a node running
// ambpf in standalone mode: enrol and unenrol pods through the agent, show
// the agent's status, and inspect one pod's datapath (what bpftool would
// show, explained).
package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"strings"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/dpstate"
)

// Config configures the CLI.
type Config struct {
	// Socket is the agent's API socket; agentapi.DefaultSocket when empty.
	// The global --socket flag overrides it.
	Socket string
	// BPFRoot is where inspect --pins reads; dpstate.DefaultRoot when
	// empty. The global --bpf-root flag overrides it.
	BPFRoot string
	// AgentBin is the ambpf-agent binary inspect --pins runs to read the
	// pins (ambpfctl links no BPF loader); when empty, the ambpf-agent
	// beside ambpfctl's own executable, else the one on PATH. The global
	// --agent-bin flag overrides it.
	AgentBin string
	Stdout   io.Writer
}

// CLI runs ambpfctl commands.
type CLI struct {
	cfg Config
}

// UsageError is a bad command line; ExitCode maps it to 2.
type UsageError struct{ Msg string }

func (e *UsageError) Error() string { return e.Msg }

func usagef(format string, args ...any) error { return &UsageError{Msg: fmt.Sprintf(format, args...)} }

// ExitCode is the process exit status for Run's error: 0, 2 for a usage
// error, 1 otherwise.
func ExitCode(err error) int {
	var ue *UsageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ue):
		return 2
	}
	return 1
}

// New returns a CLI.
func New(cfg Config) *CLI {
	if cfg.Socket == "" {
		cfg.Socket = agentapi.DefaultSocket
	}
	if cfg.BPFRoot == "" {
		cfg.BPFRoot = dpstate.DefaultRoot
	}
	if cfg.Stdout == nil {
		cfg.Stdout = io.Discard
	}
	return &CLI{cfg: cfg}
}

// Usage is the top-level help text.
const Usage = `usage: ambpfctl [--socket PATH] [--bpf-root DIR] [--agent-bin PATH] COMMAND [ARGS]

commands:
  enroll    --netns PATH --uid UID --name NAME --namespace NS [--service-account SA]
            [--ip ADDR]... [--interface DEV] [--cgroup DIR] [--dns-capture] [--bypass-inbound]
            enrol a pod: attach the datapath in its netns and hand it to the proxy
  unenroll  --uid UID            remove a pod from the mesh
  status    [--json]             the agent: readiness, datapath mode, proxies, pods
  inspect   UID [--pins] [--json]
            one pod's datapath explained; --pins reads bpffs directly (no agent running;
            ambpf-agent inspect-pins does the reading, found beside ambpfctl or on PATH)
  proxy     [--admin URL] workloads|certificates|config|pod UID
            the proxy's view, from its admin endpoint (default ` + DefaultProxyAdmin + `)
`

// Run runs one command. Its output goes to Stdout; the error, if any, is
// returned (a *UsageError for a bad command line) and not printed.
func (c *CLI) Run(ctx context.Context, args []string) error {
	global := c.flags("ambpfctl")
	socket := global.String("socket", c.cfg.Socket, "agent API socket")
	root := global.String("bpf-root", c.cfg.BPFRoot, "bpffs directory of the pins (inspect --pins)")
	agentBin := global.String("agent-bin", c.cfg.AgentBin, "the ambpf-agent binary inspect --pins reads the pins with (default: beside ambpfctl, else on PATH)")
	if err := parse(global, args); err != nil {
		return err
	}
	rest := global.Args()
	if len(rest) == 0 {
		return usagef("no command given\n\n%s", Usage)
	}
	cmd, cargs := rest[0], rest[1:]
	client := agentapi.NewClient(*socket)
	pins := pinReader{root: *root, agentBin: *agentBin}
	switch cmd {
	case "enroll", "enrol":
		return c.enroll(ctx, client, cargs)
	case "unenroll", "unenrol":
		return c.unenroll(ctx, client, cargs)
	case "status":
		return c.status(ctx, client, cargs)
	case "inspect":
		return c.inspect(ctx, client, pins, cargs)
	case "proxy":
		return c.proxy(ctx, client, pins, cargs)
	case "help":
		fmt.Fprint(c.cfg.Stdout, Usage)
		return nil
	}
	return usagef("unknown command %q\n\n%s", cmd, Usage)
}

func (c *CLI) flags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are returned, not printed
	return fs
}

// parse parses args; a flag error becomes a usage error naming the
// command's flags.
func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return usagef("%s flags:\n%s", fs.Name(), flagHelp(fs))
		}
		return usagef("%s: %v\n%s flags:\n%s", fs.Name(), err, fs.Name(), flagHelp(fs))
	}
	return nil
}

func flagHelp(fs *flag.FlagSet) string {
	var b strings.Builder
	fs.VisitAll(func(f *flag.Flag) { fmt.Fprintf(&b, "  --%-16s %s\n", f.Name, f.Usage) })
	return b.String()
}

func noArgs(fs *flag.FlagSet) error {
	if fs.NArg() > 0 {
		return usagef("%s: unexpected arguments %q", fs.Name(), fs.Args())
	}
	return nil
}

// ipList is a repeatable --ip flag.
type ipList []netip.Addr

func (l *ipList) String() string { return fmt.Sprint([]netip.Addr(*l)) }
func (l *ipList) Set(s string) error {
	for _, part := range strings.Split(s, ",") {
		a, err := netip.ParseAddr(strings.TrimSpace(part))
		if err != nil {
			return err
		}
		*l = append(*l, a)
	}
	return nil
}

func (c *CLI) enroll(ctx context.Context, client *agentapi.Client, args []string) error {
	fs := c.flags("enroll")
	var req agentapi.EnrollRequest
	var ips ipList
	fs.StringVar(&req.Netns, "netns", "", "path of the pod's network namespace (required)")
	fs.StringVar(&req.UID, "uid", "", "pod UID (required)")
	fs.StringVar(&req.Name, "name", "", "pod name (required)")
	fs.StringVar(&req.Namespace, "namespace", "", "pod namespace (required)")
	fs.StringVar(&req.ServiceAccount, "service-account", "default", "pod service account")
	fs.StringVar(&req.Cgroup, "cgroup", "", "pod cgroup v2 directory: guards the proxy mark")
	fs.StringVar(&req.Interface, "interface", "", "pod device (default eth0)")
	fs.Var(&ips, "ip", "pod address (repeatable, or comma-separated)")
	fs.BoolVar(&req.DNSCapture, "dns-capture", false, "send the pod's DNS to the proxy")
	fs.BoolVar(&req.BypassInbound, "bypass-inbound", false, "leave inbound traffic uncaptured")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := noArgs(fs); err != nil {
		return err
	}
	req.IPs = ips
	if err := req.Validate(); err != nil {
		return usagef("enroll: %v", err)
	}
	st, err := client.Enroll(ctx, req)
	if err != nil {
		return fmt.Errorf("enroll %s: %w", req.UID, err)
	}
	fmt.Fprintf(c.cfg.Stdout, "pod %s (%s/%s) enrolled: %s\n", st.UID, st.Namespace, st.Name, stateWords(st))
	return nil
}

func (c *CLI) unenroll(ctx context.Context, client *agentapi.Client, args []string) error {
	fs := c.flags("unenroll")
	uid := fs.String("uid", "", "pod UID (required)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := noArgs(fs); err != nil {
		return err
	}
	if err := agentapi.ValidateUID(*uid); err != nil {
		return usagef("unenroll: %v", err)
	}
	if err := client.Unenroll(ctx, *uid); err != nil {
		return fmt.Errorf("unenroll %s: %w", *uid, err)
	}
	fmt.Fprintf(c.cfg.Stdout, "pod %s unenrolled: its datapath is detached and the proxy stopped serving it\n", *uid)
	return nil
}

func stateWords(st agentapi.PodState) string {
	if st.State == agentapi.StatePending {
		return fmt.Sprintf("pending (datapath attached, traffic held until a proxy takes the pod: %s)", st.Reason)
	}
	return st.State + " (datapath attached, proxy serving)"
}

func (c *CLI) writeJSON(v any) error {
	enc := json.NewEncoder(c.cfg.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
