//go:build linux

package ctl_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/ctl"
	"github.com/ambpf/ambpf/pkg/nettest"
)

func run(t *testing.T, socket, root string, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	err := ctl.New(ctl.Config{Socket: socket, BPFRoot: root, AgentBin: agentBin, Stdout: &out}).Run(context.Background(), args)
	return out.String(), err
}

// agentBin is the ambpf-agent binary built for the package's tests:
// inspect --pins runs its inspect-pins command.
var agentBin string

func TestMain(m *testing.M) {
	os.Exit(func() int {
		dir, err := os.MkdirTemp("", "ambpf-ctltest-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		agentBin = filepath.Join(dir, "ambpf-agent")
		cmd := exec.Command("go", "build", "-o", agentBin, "./cmd/ambpf-agent")
		cmd.Dir = "../.."
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build ambpf-agent: %v\n%s", err, out)
			return 1
		}
		return m.Run()
	}())
}

// Every bad command line is a usage error (exit 2) that says what is
// wrong, and none reaches the agent (the socket does not exist).
func TestUsageErrors(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	good := []string{"enroll", "--netns", "/run/netns/p", "--uid", "u-1", "--name", "web", "--namespace", "shop"}
	for _, tc := range []struct {
		name     string
		args     []string
		contains string
	}{
		{"no command", nil, "no command given"},
		{"unknown command", []string{"frobnicate"}, `unknown command "frobnicate"`},
		{"unknown global flag", []string{"--nope", "status"}, "flag provided but not defined: -nope"},
		{"enroll without netns", []string{"enroll", "--uid", "u-1", "--name", "web", "--namespace", "shop"}, "netns is required"},
		{"enroll without uid", []string{"enroll", "--netns", "/run/netns/p", "--name", "web", "--namespace", "shop"}, "uid is required"},
		{"enroll bad uid", append(append([]string{}, good...), "--uid", "a/b"), `uid "a/b" is invalid`},
		{"enroll missing name and namespace", []string{"enroll", "--netns", "/run/netns/p", "--uid", "u"}, "name is required; namespace is required"},
		{"enroll relative netns", append(append([]string{}, good...), "--netns", "p"), "must be an absolute path"},
		{"enroll bad ip", append(append([]string{}, good...), "--ip", "10.0.0.300"), `invalid value "10.0.0.300" for flag -ip`},
		{"enroll bad service account", append(append([]string{}, good...), "--service-account", "Web SA"), `service_account "Web SA" is invalid`},
		{"enroll extra argument", append(append([]string{}, good...), "extra"), `unexpected arguments ["extra"]`},
		{"enroll unknown flag", append(append([]string{}, good...), "--dns"), "flag provided but not defined: -dns"},
		{"unenroll without uid", []string{"unenroll"}, "uid is required"},
		{"unenroll positional", []string{"unenroll", "u-1"}, `unexpected arguments ["u-1"]`},
		{"status extra", []string{"status", "now"}, `unexpected arguments ["now"]`},
		{"inspect without uid", []string{"inspect"}, "which pod?"},
		{"inspect bad uid", []string{"inspect", "../x"}, `uid "../x" is invalid`},
		{"inspect two uids", []string{"inspect", "a", "b"}, `unexpected arguments ["b"]`},
		{"enroll help", []string{"enroll", "--help"}, "--service-account"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := run(t, sock, "", tc.args...)
			if ctl.ExitCode(err) != 2 || !strings.Contains(err.Error(), tc.contains) {
				t.Errorf("got exit %d, %v; want a usage error containing %q", ctl.ExitCode(err), err, tc.contains)
			}
		})
	}
	// A well-formed command with no agent is a runtime error (exit 1).
	_, err := run(t, sock, "", "status")
	if ctl.ExitCode(err) != 1 || !strings.Contains(err.Error(), "call agent at "+sock) {
		t.Errorf("status with no agent: exit %d, %v", ctl.ExitCode(err), err)
	}
}

// TestCommands enrols, shows, inspects and unenrols a pod through a real
// agent.
func TestCommands(t *testing.T) {
	e := agenttest.NewEnv(t)
	topo := nettest.NewTopology(t, 1)
	e.Start(t)
	proxy := agenttest.NewProxy(t, e.Config.ZDSPath)
	proxy.Connect()
	agenttest.WaitFor(t, 10e9, "proxy synced", proxy.Ready)
	pod := topo.Pods[0]
	cg, err := pod.Cgroup()
	if err != nil {
		t.Fatal(err)
	}
	sock, root := e.Config.APISocket, e.Config.BPFRoot
	uid := "ctl-" + agenttest.RandomID()

	out, err := run(t, sock, root, "enroll", "--netns", pod.NSPath, "--uid", uid, "--name", "web", "--namespace", "shop",
		"--ip", pod.IPv4.String()+","+pod.IPv6.String(), "--cgroup", cg, "--dns-capture")
	if err != nil || !strings.Contains(out, "enrolled: enabled") {
		t.Fatalf("enroll: %v\n%s", err, out)
	}

	out, err = run(t, sock, root, "status")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ambpfctl status:\n%s", out)
	for _, want := range []string{"agent:     ready", "datapath:  clsact mode", "proxies:   1 connected, 1 synced", "1 enrolled, 1 enabled, 0 pending", "KiB per enrolled pod",
		uid, "shop/web", "dns-capture"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	out, err = run(t, sock, root, "status", "--json")
	var sj struct {
		Agent agentapi.Status     `json:"agent"`
		Pods  []agentapi.PodState `json:"pods"`
	}
	if err != nil || json.Unmarshal([]byte(out), &sj) != nil || len(sj.Pods) != 1 || sj.Pods[0].UID != uid || sj.Agent.Features.Mode != "clsact" {
		t.Errorf("status --json: %v\n%s", err, out)
	}

	// Through the agent and straight from the pins, the same datapath.
	for _, args := range [][]string{{"inspect", uid}, {"inspect", uid, "--pins"}, {"--bpf-root", root, "inspect", "--pins", uid}} {
		out, err = run(t, sock, root, args...)
		if err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		t.Logf("ambpfctl %v:\n%s", args, out)
		for _, want := range []string{"clsact ingress eth0", "clsact egress eth0", "clsact egress lo", "cgroup setsockopt", "entry_ingress",
			"key in the node's maps",
			"the mark guard refuses the proxy mark", "DNS capture on", "captured_in", "dropped_no_listener"} {
			if !strings.Contains(out, want) {
				t.Errorf("%v lacks %q:\n%s", args, want, out)
			}
		}
		if strings.Contains(out, "NOT ATTACHED") {
			t.Errorf("%v: an attachment is missing:\n%s", args, out)
		}
	}
	out, err = run(t, sock, root, "inspect", uid, "--json")
	var ps agentapi.PodStatus
	if err != nil || json.Unmarshal([]byte(out), &ps) != nil || ps.Datapath == nil || len(ps.Datapath.Attachments) != 4 || ps.Datapath.Attachments[0].ProgramID == 0 {
		t.Errorf("inspect --json: %v\n%s", err, out)
	}

	if out, err = run(t, sock, root, "unenroll", "--uid", uid); err != nil || !strings.Contains(out, "unenrolled") {
		t.Fatalf("unenroll: %v\n%s", err, out)
	}
	_, err = run(t, sock, root, "unenroll", "--uid", uid)
	if ctl.ExitCode(err) != 1 || !strings.Contains(err.Error(), "is not enrolled") {
		t.Errorf("second unenroll: %v", err)
	}
	_, err = run(t, sock, root, "inspect", uid, "--pins")
	if err == nil || !strings.Contains(err.Error(), "not attached") {
		t.Errorf("inspect --pins after unenroll: %v", err)
	}
	// Without the agent's binary --pins cannot read, and says why.
	var out2 bytes.Buffer
	err = ctl.New(ctl.Config{Socket: sock, BPFRoot: root, AgentBin: filepath.Join(t.TempDir(), "none"), Stdout: &out2}).
		Run(context.Background(), []string{"inspect", uid, "--pins"})
	if ctl.ExitCode(err) != 1 || !strings.Contains(err.Error(), "inspect-pins") {
		t.Errorf("inspect --pins with no ambpf-agent: %v", err)
	}
}
