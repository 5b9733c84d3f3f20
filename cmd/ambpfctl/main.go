//go:build linux

// Command ambpfctl enrols pods with the ambpf agent and shows what the
// datapath does. See pkg/ctl.
//
// It finds the agent through the agent's own variables, so it works
// unconfigured inside the agent's pod (kubectl exec) or a shell set up for
// the agent: AMBPF_API_SOCKET (or the older AMBPF_AGENT_SOCKET) and
// AMBPF_BPF_ROOT; --socket and --bpf-root win. Unlike the daemons it does
// not refuse other AMBPF_ variables: it runs among the agent's.
package main

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"os/signal"

	"github.com/ambpf/ambpf/pkg/ctl"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	err := ctl.New(ctl.Config{
		Socket:  cmp.Or(os.Getenv("AMBPF_API_SOCKET"), os.Getenv("AMBPF_AGENT_SOCKET")),
		BPFRoot: os.Getenv("AMBPF_BPF_ROOT"),
		Stdout:  os.Stdout,
	}).Run(ctx, os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "ambpfctl:", err)
	}
	stop()
	os.Exit(ctl.ExitCode(err))
}
