package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// TestFlagsAndEnvironment: AMBPF_CA_* set the flags, the command line
// wins, an unknown variable and a malformed node account are startup
// errors.
func TestFlagsAndEnvironment(t *testing.T) {
	var out bytes.Buffer
	err := run([]string{"--print-config", "--rate=7"}, []string{
		"AMBPF_CA_TRUSTED_NODE_ACCOUNTS=ambpf-system/ambpf-proxy, other/ztunnel",
		"AMBPF_CA_MAX_CERT_LIFETIME=48h",
		"AMBPF_CA_RATE=3",
	}, &out)
	if err != nil {
		t.Fatal(err)
	}
	var o options
	if err := json.Unmarshal(out.Bytes(), &o); err != nil {
		t.Fatal(err)
	}
	if len(o.TrustedAccounts) != 2 || o.TrustedAccounts[1] != "other/ztunnel" || o.MaxLifetime != 48*time.Hour || o.Rate != 7 || o.Audiences[0] != "istio-ca" {
		t.Errorf("parsed %+v", o)
	}
	if err := run([]string{"--print-config"}, []string{"AMBPF_CA_TRUSTED_ACCOUNTS=x/y"}, &out); err == nil || !strings.Contains(err.Error(), "AMBPF_CA_TRUSTED_ACCOUNTS") {
		t.Errorf("unknown variable: %v", err)
	}
	if err := run([]string{"--print-config", "--trusted-node-accounts=ztunnel"}, nil, &out); err == nil || !strings.Contains(err.Error(), "not namespace/serviceaccount") {
		t.Errorf("malformed account: %v", err)
	}
}
