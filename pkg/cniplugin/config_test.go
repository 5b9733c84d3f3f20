//go:build linux

package cniplugin

import (
	"errors"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/ambpf/ambpf/pkg/agentapi"
)

const prevResult = `{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/run/netns/x"}],
 "ips":[{"interface":0,"address":"10.89.0.5/24","gateway":"10.89.0.1"},{"interface":0,"address":"fd89::5/64"}]}`

func confJSON(extra string) []byte {
	return []byte(`{"cniVersion":"1.0.0","name":"net","type":"ambpf-cni","prevResult":` + prevResult + extra + `}`)
}

func TestParseConfig(t *testing.T) {
	conf, err := ParseConfig(confJSON(`,"agent_socket":"/x/agent.sock","dns_capture":true,
		"pod":{"uid":"u-1","name":"web","namespace":"shop","service_account":"web-sa"}`))
	if err != nil {
		t.Fatal(err)
	}
	if conf.AgentSocket != "/x/agent.sock" || !conf.DNSCapture || conf.BypassInbound || conf.Pod.Name != "web" {
		t.Errorf("parsed %+v", conf)
	}
	ips, err := prevIPs(conf)
	want := []netip.Addr{netip.MustParseAddr("10.89.0.5"), netip.MustParseAddr("fd89::5")}
	if err != nil || !slices.Equal(ips, want) {
		t.Errorf("prevIPs = %v, %v; want %v", ips, err, want)
	}

	def, err := ParseConfig([]byte(`{"cniVersion":"1.0.0","name":"net","type":"ambpf-cni"}`))
	if err != nil {
		t.Fatal(err)
	}
	if def.AgentSocket != agentapi.DefaultSocket {
		t.Errorf("default socket %q", def.AgentSocket)
	}
	if _, err := prevIPs(def); err == nil || !strings.Contains(err.Error(), "chained plugin") {
		t.Errorf("no prevResult: %v", err)
	}

	for _, tc := range []struct{ name, in, contains string }{
		{"not json", `{"type":`, "parse ambpf-cni config"},
		{"wrong type", `{"cniVersion":"1.0.0","name":"n","type":"bridge"}`, `type is "bridge"`},
		{"bad prevResult", `{"cniVersion":"1.0.0","name":"n","type":"ambpf-cni","prevResult":{"ips":"x"}}`, "prevResult"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := ParseConfig([]byte(tc.in)); err == nil || !strings.Contains(err.Error(), tc.contains) {
				t.Errorf("got %v, want an error containing %q", err, tc.contains)
			}
		})
	}
}

func TestIdentity(t *testing.T) {
	conf := &NetConf{Pod: PodConf{UID: "cfg-uid", Name: "cfg-name", Namespace: "cfg-ns"}}
	for _, tc := range []struct {
		name, args string
		want       [4]string // uid, name, namespace, service account
		wantErr    string
	}{
		{"config only", "", [4]string{"cfg-uid", "cfg-name", "cfg-ns", "default"}, ""},
		{"kubernetes args win", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1234-5678",
			[4]string{"1234-5678", "web-0", "shop", "default"}, ""},
		{"partial args", "K8S_POD_NAME=web-1", [4]string{"cfg-uid", "web-1", "cfg-ns", "default"}, ""},
		{"malformed", "K8S_POD_NAME", [4]string{}, `"K8S_POD_NAME" is not KEY=VALUE`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, err := identity(conf, tc.args)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want error %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := [4]string{req.UID, req.Name, req.Namespace, req.ServiceAccount}; got != tc.want {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
	sa := &NetConf{Pod: PodConf{UID: "u", ServiceAccount: "web-sa"}}
	if req, _ := identity(sa, ""); req.ServiceAccount != "web-sa" {
		t.Errorf("service account from config: %q", req.ServiceAccount)
	}
	if _, err := identity(&NetConf{}, "K8S_POD_NAME=x"); err == nil || !strings.Contains(err.Error(), "no pod UID") {
		t.Errorf("no uid anywhere: %v", err)
	}
}

// With no agent listening, ADD fails with "try again later", DEL of a pod
// whose netns is gone succeeds, STATUS fails.
func TestAgentDown(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	conf := confJSON(`,"agent_socket":"` + sock + `","pod":{"uid":"u-1","name":"web","namespace":"shop"}`)
	args := &skel.CmdArgs{ContainerID: "c1", Netns: "/proc/self/ns/net", IfName: "eth0", StdinData: conf}

	err := Add(args)
	var te *types.Error
	if !errors.As(err, &te) || te.Code != types.ErrTryAgainLater || !strings.Contains(te.Msg, "not reachable at "+sock) {
		t.Errorf("ADD with the agent down: %v", err)
	}
	if err := Status(args); !errors.As(err, &te) || te.Code != types.ErrPluginNotAvailable {
		t.Errorf("STATUS with the agent down: %v", err)
	}
	if err := Del(args); err == nil {
		t.Errorf("DEL with the agent down and the netns alive succeeded; the pod would stay enrolled")
	}
	gone := *args
	gone.Netns = filepath.Join(t.TempDir(), "gone")
	if err := Del(&gone); err != nil {
		t.Errorf("DEL with the agent down and the netns gone: %v", err)
	}
	bad := *args
	bad.Args = "K8S_POD_NAME=Not_A_Name"
	if err := Add(&bad); !errors.As(err, &te) || !strings.Contains(te.Msg, `name "Not_A_Name" is invalid`) {
		t.Errorf("ADD with a bad pod name: %v", err)
	}
}
