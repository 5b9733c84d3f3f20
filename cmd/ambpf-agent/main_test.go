//go:build linux

package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"strings"
	"testing"
)

func printConfigOf(t *testing.T, args, environ []string) printed {
	t.Helper()
	var out bytes.Buffer
	if err := run(append([]string{"--print-config"}, args...), environ, &out); err != nil {
		t.Fatal(err)
	}
	var p printed
	if err := json.Unmarshal(out.Bytes(), &p); err != nil {
		t.Fatalf("--print-config output: %v\n%s", err, out.String())
	}
	return p
}

func TestPrintConfig(t *testing.T) {
	p := printConfigOf(t, []string{"--state-dir=/cli"}, []string{
		"AMBPF_STATE_DIR=/env",
		"AMBPF_MODE=clsact",
		"AMBPF_PROBE_SNAT=false",
		"AMBPF_EXCLUDED_NAMESPACES=kube-system, ops",
		"AMBPF_POD_NAME=agent-x", "AMBPF_POD_NAMESPACE=ambpf-system",
		"NODE_NAME=alias-node", "AMBPF_NODE_NAME=node-1",
		"AMBPF_AGENT_SOCKET=/run/alias.sock",
		"AMBPF_FASTPATH=to-proxy", "AMBPF_FASTPATH_DEFAULT=disabled",
		// Others' variables: not errors.
		"AMBPF_PROXY_MTLS_MODE=STRICT", "AMBPF_TOOLS_DIR=/tools", "AMBPF_KUBE_BIN_DIR=/kube",
	})
	if p.Config.StateDir != "/cli" {
		t.Errorf("state dir %q: the command line must win", p.Config.StateDir)
	}
	if p.Mode != "clsact" || !p.Config.NoProbeSNAT || p.Config.APISocket != "/run/alias.sock" {
		t.Errorf("mode %q, no probe snat %v, api socket %q", p.Mode, p.Config.NoProbeSNAT, p.Config.APISocket)
	}
	if p.Config.FastPath != "to-proxy" || !p.Config.FastPathOptIn {
		t.Errorf("fast path %q, opt-in %v: want to-proxy, opt-in", p.Config.FastPath, p.Config.FastPathOptIn)
	}
	if p := printConfigOf(t, nil, []string{"AMBPF_FASTPATH=both"}); p.Config.FastPathOptIn {
		t.Error("the fast path is opt-in without --fastpath-default")
	}
	k := p.Kubernetes
	if k.NodeName != "node-1" || k.Self != "ambpf-system/agent-x" || strings.Join(k.ExcludedNamespaces, "|") != "kube-system|ops" {
		t.Errorf("kubernetes settings %+v", k)
	}
}

func TestStartupErrors(t *testing.T) {
	for _, c := range []struct {
		environ []string
		want    string
	}{
		{[]string{"AMBPF_AGENT_SOCKETS=/x"}, "AMBPF_AGENT_SOCKETS names no flag of ambpf-agent"},
		{[]string{"AMBPF_MODE=xdp"}, `-mode "xdp"`},
		{[]string{"AMBPF_EXCLUDE_PODS=a in (("}, "-exclude-pods"},
		{[]string{"AMBPF_ENABLEMENT_SELECTORS=- podSelector: {matchLabel: {a: b}}"}, "-enablement-selectors"},
		{[]string{"AMBPF_DNS_CAPTURE=yes please"}, "AMBPF_DNS_CAPTURE"},
		{[]string{"AMBPF_FASTPATH_DEFAULT=on"}, "-fastpath-default"},
	} {
		err := run([]string{"--print-config"}, c.environ, new(bytes.Buffer))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: error %v, want %q", c.environ, err, c.want)
		}
	}
}

// TestNoProxyFlags: AMBPF_PROXY_* is ignored as the proxy's, so an agent
// flag named proxy-* could never be set from the environment.
func TestNoProxyFlags(t *testing.T) {
	var o options
	o.flagSet().VisitAll(func(f *flag.Flag) {
		if strings.HasPrefix(f.Name, "proxy-") {
			t.Errorf("agent flag -%s: its variable %s would be taken for the proxy's", f.Name, binding.Var(f.Name))
		}
	})
}
