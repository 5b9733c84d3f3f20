//go:build linux

package agentapi

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

// decodeEnroll decodes a request body the way the agent does: one JSON
// object, unknown fields refused.
func decodeEnroll(body []byte) (EnrollRequest, error) {
	var req EnrollRequest
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	err := dec.Decode(&req)
	return req, err
}

// FuzzEnrollRequest feeds arbitrary enrolment bodies through the
// decoding and validation the agent applies. Properties: Validate never
// panics and names every problem on one line; a request that validates
// has a UID that ValidateUID accepts, an absolute netns path, and
// survives a JSON round trip unchanged and still valid; the Error body
// the agent would send back decodes to the same error.
func FuzzEnrollRequest(f *testing.F) {
	for _, s := range []string{
		`{"uid":"u-1","name":"web-0","namespace":"shop","service_account":"default","netns":"/var/run/netns/x"}`,
		`{"uid":"u-1","name":"web-0","namespace":"shop","service_account":"sa","netns":"/proc/1/ns/net","ips":["10.0.0.1","fd00::1"],"cgroup":"/sys/fs/cgroup/kubepods/pod1","interface":"eth1","dns_capture":true,"bypass_inbound":true}`,
		`{"uid":"-bad","name":"Web","namespace":"a.b","netns":"relative"}`,
		`{"uid":"u","netns":"/x/../y","ips":["10.0.0.300"]}`,
		`{"uid":"u","extra":1}`, `{"uid":1}`, `[]`, `{}`, `{"interface":"a/b"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		req, err := decodeEnroll(body)
		if err != nil {
			return
		}
		verr := req.Validate()
		if verr != nil {
			if msg := verr.Error(); msg == "" || strings.Contains(msg, "\n") {
				t.Fatalf("validation error %q: want one non-empty line", msg)
			}
			e := Error{HTTPStatus: 400, Code: CodeInvalid, Message: verr.Error()}
			raw, err := json.Marshal(&e)
			if err != nil {
				t.Fatal(err)
			}
			var back Error
			if err := json.Unmarshal(raw, &back); err != nil || back.Code != e.Code || back.Message != e.Message {
				t.Fatalf("error body %s decodes to %+v, %v", raw, back, err)
			}
			return
		}
		if ValidateUID(req.UID) != nil || !strings.HasPrefix(req.Netns, "/") {
			t.Fatalf("valid request with uid %q, netns %q", req.UID, req.Netns)
		}
		if len(req.IPs) == 0 {
			req.IPs = nil // "ips": [] and no ips are the same request (omitempty)
		}
		raw, err := json.Marshal(req)
		if err != nil {
			t.Fatalf("marshal a valid request: %v", err)
		}
		again, err := decodeEnroll(raw)
		if err != nil || !reflect.DeepEqual(again, req) {
			t.Fatalf("round trip of %+v through %s: %+v, %v", req, raw, again, err)
		}
		if err := again.Validate(); err != nil {
			t.Fatalf("round-tripped request no longer valid: %v", err)
		}
	})
}
