package envflag

import (
	"bytes"
	"errors"
	"flag"
	"strings"
	"testing"
	"time"
)

// testFlags is a small command: a string, a bool, a duration and a
// comma list, as the ambpf binaries have.
type testFlags struct {
	fs       *flag.FlagSet
	zds      string
	dns      bool
	poll     time.Duration
	nodeName string
}

func newTestFlags() *testFlags {
	f := &testFlags{fs: flag.NewFlagSet("cmd", flag.ContinueOnError)}
	f.fs.SetOutput(new(bytes.Buffer))
	f.fs.StringVar(&f.zds, "zds-path", "/default.sock", "")
	f.fs.BoolVar(&f.dns, "dns-capture", false, "")
	f.fs.DurationVar(&f.poll, "poll-interval", time.Second, "")
	f.fs.StringVar(&f.nodeName, "node-name", "", "")
	return f
}

var proxyBinding = Binding{Prefix: "AMBPF_PROXY_"}

func TestVar(t *testing.T) {
	if got := proxyBinding.Var("hbone-h3-retry-after"); got != "AMBPF_PROXY_HBONE_H3_RETRY_AFTER" {
		t.Errorf("Var = %q", got)
	}
}

func TestEnvironmentSetsFlags(t *testing.T) {
	f := newTestFlags()
	err := proxyBinding.Parse(f.fs, nil, []string{
		"AMBPF_PROXY_ZDS_PATH=/run/z.sock",
		"AMBPF_PROXY_DNS_CAPTURE=true",
		"AMBPF_PROXY_POLL_INTERVAL=250ms",
		"PATH=/bin", "AMBPF_NODE_NAME=other-prefix", // not ours: ignored
	})
	if err != nil {
		t.Fatal(err)
	}
	if f.zds != "/run/z.sock" || !f.dns || f.poll != 250*time.Millisecond || f.nodeName != "" {
		t.Errorf("parsed zds=%q dns=%v poll=%v node=%q", f.zds, f.dns, f.poll, f.nodeName)
	}
}

func TestCommandLineWins(t *testing.T) {
	f := newTestFlags()
	err := proxyBinding.Parse(f.fs, []string{"--zds-path=/cli.sock", "-dns-capture=false"},
		[]string{"AMBPF_PROXY_ZDS_PATH=/env.sock", "AMBPF_PROXY_DNS_CAPTURE=true", "AMBPF_PROXY_NODE_NAME=n1"})
	if err != nil {
		t.Fatal(err)
	}
	if f.zds != "/cli.sock" || f.dns || f.nodeName != "n1" {
		t.Errorf("parsed zds=%q dns=%v node=%q; want the command line's zds and dns, the environment's node", f.zds, f.dns, f.nodeName)
	}
}

func TestEmptyValueIsSet(t *testing.T) {
	// An empty variable sets the flag to "": for -zds-path that means no
	// ZDS, which differs from the default, so it must not be skipped.
	f := newTestFlags()
	if err := proxyBinding.Parse(f.fs, nil, []string{"AMBPF_PROXY_ZDS_PATH="}); err != nil {
		t.Fatal(err)
	}
	if f.zds != "" {
		t.Errorf("zds = %q, want empty", f.zds)
	}
}

func TestUnknownVariableIsAnError(t *testing.T) {
	f := newTestFlags()
	err := proxyBinding.Parse(f.fs, nil, []string{"AMBPF_PROXY_MTLS_MODE=STRICT", "AMBPF_PROXY_ZDS_PATH=/z", "AMBPF_PROXY_EXCLUDED_NAMESPACES=kube-system"})
	if err == nil {
		t.Fatal("unknown variables accepted")
	}
	for _, want := range []string{"AMBPF_PROXY_MTLS_MODE names no flag of cmd", "AMBPF_PROXY_EXCLUDED_NAMESPACES names no flag of cmd"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

func TestBadValueNamesTheVariable(t *testing.T) {
	f := newTestFlags()
	err := proxyBinding.Parse(f.fs, nil, []string{"AMBPF_PROXY_DNS_CAPTURE=maybe"})
	if err == nil || !strings.Contains(err.Error(), `AMBPF_PROXY_DNS_CAPTURE="maybe"`) {
		t.Errorf("error = %v, want one naming AMBPF_PROXY_DNS_CAPTURE", err)
	}
}

func TestIgnoreAndAliases(t *testing.T) {
	agent := Binding{
		Prefix:  "AMBPF_",
		Aliases: map[string]string{"NODE_NAME": "node-name", "AMBPF_AGENT_SOCKET": "zds-path"},
		Ignore:  []string{"AMBPF_PROXY_", "AMBPF_TOOLS_DIR"},
	}
	f := newTestFlags()
	err := agent.Parse(f.fs, nil, []string{
		"AMBPF_PROXY_MTLS_MODE=STRICT", // the proxy's: ignored
		"AMBPF_TOOLS_DIR=/tools",       // exact ignore
		"NODE_NAME=alias-node",
		"AMBPF_AGENT_SOCKET=/alias.sock",
	})
	if err != nil {
		t.Fatal(err)
	}
	if f.nodeName != "alias-node" || f.zds != "/alias.sock" {
		t.Errorf("aliases: node=%q zds=%q", f.nodeName, f.zds)
	}
	// The flag's own variable wins over its alias.
	f = newTestFlags()
	if err := agent.Parse(f.fs, nil, []string{"NODE_NAME=alias-node", "AMBPF_NODE_NAME=own-node"}); err != nil {
		t.Fatal(err)
	}
	if f.nodeName != "own-node" {
		t.Errorf("node = %q, want the flag's own variable over its alias", f.nodeName)
	}
	// An exact ignore is not a prefix.
	f = newTestFlags()
	if err := agent.Parse(f.fs, nil, []string{"AMBPF_TOOLS_DIRS=/x"}); err == nil {
		t.Error("AMBPF_TOOLS_DIRS accepted: an exact Ignore entry acted as a prefix")
	}
}

func TestPositionalArgumentsAreAnError(t *testing.T) {
	f := newTestFlags()
	if err := proxyBinding.Parse(f.fs, []string{"-dns-capture", "extra"}, nil); err == nil || !strings.Contains(err.Error(), "extra") {
		t.Errorf("error = %v, want unexpected arguments", err)
	}
}

func TestHelp(t *testing.T) {
	f := newTestFlags()
	out := new(bytes.Buffer)
	f.fs.SetOutput(out)
	f.fs.Usage = proxyBinding.Usage(f.fs)
	if err := proxyBinding.Parse(f.fs, []string{"-help"}, nil); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("error = %v, want flag.ErrHelp", err)
	}
	if !strings.Contains(out.String(), "-poll-interval (AMBPF_PROXY_POLL_INTERVAL)") {
		t.Errorf("usage does not name the variables:\n%s", out)
	}
}

func TestMisconfiguredBindingPanics(t *testing.T) {
	for name, b := range map[string]Binding{
		"alias to no flag":  {Prefix: "X_", Aliases: map[string]string{"Y": "no-such-flag"}},
		"ignore a flag var": {Prefix: "X_", Ignore: []string{"X_NODE_"}},
	} {
		t.Run(name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Error("no panic")
				}
			}()
			b.Parse(newTestFlags().fs, nil, nil)
		})
	}
}
