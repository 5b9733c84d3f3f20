//go:build linux

package cniplugin

import (
	"strings"
	"testing"
)

// FuzzConfig feeds arbitrary stdin configurations and CNI_ARGS to the
// plugin's parsing, as a runtime would. Properties: an accepted config
// is of our type with a socket; the pod identity takes each field from
// CNI_ARGS first and the config second, never invents a UID, and fails
// only for a malformed CNI_ARGS or when neither names a UID; prevIPs
// returns unmapped addresses or an error, never a panic.
func FuzzConfig(f *testing.F) {
	f.Add(confJSON(`,"pod":{"uid":"u-1","name":"web","namespace":"shop","service_account":"sa"}`), "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=abc")
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"net","type":"ambpf-cni"}`), "K8S_POD_UID=;K8S_POD_NAME=x")
	f.Add([]byte(`{"cniVersion":"0.4.0","name":"net","type":"ambpf-cni","prevResult":{"ips":[{"version":"4","address":"10.0.0.2/24"}]}}`), ";;K8S_POD_INFRA_CONTAINER_ID=1;")
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"n","type":"bridge"}`), "=x")
	f.Add([]byte(`{"type":"ambpf-cni","prevResult":{"ips":[{"address":"::ffff:10.0.0.1/96"}]}}`), "K8S_POD_UID")
	f.Fuzz(func(t *testing.T, stdin []byte, cniArgs string) {
		args, argsErr := parseArgs(cniArgs)
		if argsErr == nil {
			checkArgs(t, cniArgs, args)
		}
		conf, err := ParseConfig(stdin)
		if err != nil {
			if conf != nil {
				t.Fatalf("ParseConfig returned a config with error %v", err)
			}
			return
		}
		if conf.Type != PluginType || conf.AgentSocket == "" {
			t.Fatalf("accepted config of type %q with socket %q", conf.Type, conf.AgentSocket)
		}
		if ips, err := prevIPs(conf); err == nil {
			for _, ip := range ips {
				if !ip.IsValid() || ip.Is4In6() {
					t.Fatalf("prevIPs gave %v", ip)
				}
			}
		}
		req, err := identity(conf, cniArgs)
		if argsErr != nil {
			if err == nil {
				t.Fatalf("CNI_ARGS %q rejected by parseArgs but identity accepted it", cniArgs)
			}
			return
		}
		first := func(a, b string) string {
			if a != "" {
				return a
			}
			return b
		}
		wantUID := first(args.UID, conf.Pod.UID)
		if (err != nil) != (wantUID == "") {
			t.Fatalf("UID %q: identity error %v", wantUID, err)
		}
		if req.UID != wantUID || req.Name != first(args.Name, conf.Pod.Name) || req.Namespace != first(args.Namespace, conf.Pod.Namespace) ||
			req.ServiceAccount != first(conf.Pod.ServiceAccount, defaultServiceAccount) ||
			req.DNSCapture != conf.DNSCapture || req.BypassInbound != conf.BypassInbound {
			t.Fatalf("identity(%+v, %q) = %+v", conf.Pod, cniArgs, req)
		}
	})
}

// checkArgs re-reads CNI_ARGS the simplest way (the last K8S_ key of
// each name wins) and compares with what parseArgs found.
func checkArgs(t *testing.T, cniArgs string, got podArgs) {
	t.Helper()
	var want podArgs
	for _, pair := range strings.Split(cniArgs, ";") {
		if pair == "" {
			continue
		}
		i := strings.IndexByte(pair, '=')
		if i <= 0 {
			t.Fatalf("CNI_ARGS %q: pair %q accepted without KEY=", cniArgs, pair)
		}
		switch pair[:i] {
		case "K8S_POD_UID":
			want.UID = pair[i+1:]
		case "K8S_POD_NAME":
			want.Name = pair[i+1:]
		case "K8S_POD_NAMESPACE":
			want.Namespace = pair[i+1:]
		}
	}
	if got != want {
		t.Fatalf("parseArgs(%q) = %+v, want %+v", cniArgs, got, want)
	}
}
