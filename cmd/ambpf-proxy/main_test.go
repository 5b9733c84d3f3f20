//go:build linux

package main

import (
	"bytes"
	"encoding/json"
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
	p := printConfigOf(t, []string{"--trust-domain=cli.example"}, []string{
		"AMBPF_PROXY_TRUST_DOMAIN=env.example",
		"AMBPF_PROXY_MTLS_MODE=STRICT",
		"AMBPF_PROXY_KUBERNETES=true",
		"AMBPF_PROXY_DNS_UPSTREAM=10.0.0.10, [fd00::a]:5353",
		"AMBPF_PROXY_HBONE_H3_NAMESPACES=a,,b",
		"AMBPF_PROXY_LOG_LEVEL=debug",
	})
	if p.Config.TrustDomain != "cli.example" {
		t.Errorf("trust domain %q: the command line must win", p.Config.TrustDomain)
	}
	if p.Config.MTLSMode != "STRICT" || p.Config.Kubernetes != "in-cluster" || p.LogLevel != "DEBUG" {
		t.Errorf("mtls %q, kubernetes %q, log level %q", p.Config.MTLSMode, p.Config.Kubernetes, p.LogLevel)
	}
	if got := p.Config.DNSUpstreams; len(got) != 2 || got[0].String() != "10.0.0.10:53" || got[1].String() != "[fd00::a]:5353" {
		t.Errorf("dns upstreams %v", got)
	}
	if got := p.Config.H3.Namespaces; len(got) != 2 || got[0] != "a" || got[1] != "b" {
		t.Errorf("h3 namespaces %q", got)
	}
}

func TestStartupErrors(t *testing.T) {
	for _, c := range []struct {
		environ []string
		want    string
	}{
		{[]string{"AMBPF_PROXY_NODE_NAME=n1"}, "AMBPF_PROXY_NODE_NAME names no flag of ambpf-proxy"},
		{[]string{"AMBPF_PROXY_MTLS_MODE=DISABLE"}, "-mtls-mode: DISABLE is not supported"},
		{[]string{"AMBPF_PROXY_DNS_UPSTREAM=resolver.example"}, `dns upstream "resolver.example"`},
		{[]string{"AMBPF_PROXY_DIAL_TIMEOUT=soon"}, "AMBPF_PROXY_DIAL_TIMEOUT"},
	} {
		err := run([]string{"--print-config"}, c.environ, new(bytes.Buffer))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: error %v, want %q", c.environ, err, c.want)
		}
	}
}
