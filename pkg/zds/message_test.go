package zds

import (
	"bytes"
	"encoding/hex"
	"errors"
	"reflect"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestKnownEncodings checks the byte sequences given in the spec, both
// ways.
func TestKnownEncodings(t *testing.T) {
	mustReq := func(p RequestPayload) []byte {
		b, err := WorkloadRequest{Payload: p}.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	cases := []struct {
		name string
		got  []byte
		want string
	}{
		{"hello V1", Hello{Version: V1}.Marshal(), "08 01"},
		{"ack OK", WorkloadResponse{Ack: &Ack{}}.Marshal(), "0a 00"},
		{"snapshot sent", mustReq(&SnapshotSent{}), "1a 00"},
		{"keep u1", mustReq(&KeepWorkload{UID: "u1"}), "2a 04 0a 02 75 31"},
		{"del u1", mustReq(&DelWorkload{UID: "u1"}), "12 04 12 02 75 31"},
	}
	for _, c := range cases {
		if want := unhex(t, c.want); !bytes.Equal(c.got, want) {
			t.Errorf("%s: encoded % x, want % x", c.name, c.got, want)
		}
	}

	var h Hello
	if err := h.Unmarshal(unhex(t, "08 01")); err != nil || h.Version != V1 {
		t.Errorf("decode hello: %+v, %v", h, err)
	}
	var resp WorkloadResponse
	if err := resp.Unmarshal(unhex(t, "0a 00")); err != nil || resp.Ack == nil || resp.Ack.Error != "" {
		t.Errorf("decode ack: %+v, %v", resp, err)
	}
	decodes := map[string]RequestPayload{
		"1a 00":             &SnapshotSent{},
		"2a 04 0a 02 75 31": &KeepWorkload{UID: "u1"},
		"12 04 12 02 75 31": &DelWorkload{UID: "u1"},
	}
	for in, want := range decodes {
		var r WorkloadRequest
		if err := r.Unmarshal(unhex(t, in)); err != nil {
			t.Errorf("decode %s: %v", in, err)
			continue
		}
		if !reflect.DeepEqual(r.Payload, want) {
			t.Errorf("decode %s: got %#v, want %#v", in, r.Payload, want)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	payloads := []RequestPayload{
		&AddWorkload{UID: "6f1c-uid", WorkloadInfo: &WorkloadInfo{Name: "web-0", Namespace: "shop", ServiceAccount: "web"}},
		&AddWorkload{UID: "fp", WorkloadInfo: &WorkloadInfo{Name: "web-1", Namespace: "shop", FastPath: true}},
		&AddWorkload{UID: "rp", WorkloadInfo: &WorkloadInfo{Name: "web-2", Namespace: "shop", ReusePort: ReusePortAllowed}},
		&AddWorkload{UID: "rp", WorkloadInfo: &WorkloadInfo{Name: "web-3", FastPath: true, ReusePort: ReusePortRefused}},
		&AddWorkload{UID: "rp", WorkloadInfo: &WorkloadInfo{ReusePort: 7}},  // unknown value kept
		&AddWorkload{UID: "rp", WorkloadInfo: &WorkloadInfo{ReusePort: -1}}, // sign-extended
		&AddWorkload{UID: "u", WorkloadInfo: &WorkloadInfo{}},               // empty info still present
		&AddWorkload{UID: "u"},
		&KeepWorkload{UID: "k"},
		&DelWorkload{UID: "d"},
		&SnapshotSent{},
		&KeepWorkload{}, // empty member: still a member
	}
	for _, p := range payloads {
		b, err := WorkloadRequest{Payload: p}.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		var r WorkloadRequest
		if err := r.Unmarshal(b); err != nil {
			t.Errorf("%#v: %v", p, err)
			continue
		}
		if !reflect.DeepEqual(r.Payload, p) {
			t.Errorf("round trip %#v -> % x -> %#v", p, b, r.Payload)
		}
	}
	for _, a := range []Ack{{}, {Error: "port 15008 in use"}} {
		var r WorkloadResponse
		if err := r.Unmarshal(WorkloadResponse{Ack: &a}.Marshal()); err != nil || *r.Ack != a {
			t.Errorf("ack %+v: got %+v, %v", a, r.Ack, err)
		}
	}
	if _, err := (WorkloadRequest{}).Marshal(); !errors.Is(err, ErrNoPayload) {
		t.Errorf("marshal empty request: %v, want ErrNoPayload", err)
	}
}

// TestProto3Rules checks decoding rules that the generated code of other
// implementations follows.
func TestProto3Rules(t *testing.T) {
	add := func(fields string) string { // wrap AddWorkload bytes in field 1
		b := unhex(t, fields)
		return hex.EncodeToString(protowire.AppendBytes([]byte{0x0a}, b))
	}
	cases := []struct {
		name string
		in   string
		want RequestPayload // nil: must fail
	}{
		{"unknown fields skipped", "30 07 3d 01020304 1a 00 41 0102030405060708", &SnapshotSent{}},
		{"unknown field inside member", "2a 06 0a 02 75 31 58 01", &KeepWorkload{UID: "u1"}},
		{"last member wins", "1a 00 2a 04 0a 02 75 31", &KeepWorkload{UID: "u1"}},
		{"same member merges", "2a 04 0a 02 75 31 2a 00", &KeepWorkload{UID: "u1"}},
		{"last scalar wins", "2a 08 0a 02 75 31 0a 02 75 32", &KeepWorkload{UID: "u2"}},
		{"wrong wire type is unknown", "2a 06 08 05 0a 02 75 31", &KeepWorkload{UID: "u1"}},
		{"info merges", add("0a 01 61 12 04 0a 02 6e 31 12 04 12 02 6e 73"),
			&AddWorkload{UID: "a", WorkloadInfo: &WorkloadInfo{Name: "n1", Namespace: "ns"}}},
		{"reserved info field 4 skipped", add("12 04 22 02 74 64"), &AddWorkload{WorkloadInfo: &WorkloadInfo{}}},
		{"empty", "", nil},
		{"only unknown fields", "20 01", nil},
		{"member with varint wire type", "18 00", nil},
		{"truncated length", "2a 05 0a 02 75 31", nil},
		{"bad varint", "2a ff ff ff ff ff ff ff ff ff ff", nil},
		{"field number 0", "02 00", nil},
		{"invalid utf-8", "2a 04 0a 02 ff fe", nil},
		{"unterminated group", "0b 1a 00", nil},
	}
	for _, c := range cases {
		var r WorkloadRequest
		err := r.Unmarshal(unhex(t, c.in))
		if c.want == nil {
			if err == nil {
				t.Errorf("%s: decoded %#v, want error", c.name, r.Payload)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
		} else if !reflect.DeepEqual(r.Payload, c.want) {
			t.Errorf("%s: got %#v, want %#v", c.name, r.Payload, c.want)
		}
	}
	var h Hello
	if err := h.Unmarshal(unhex(t, "08 02")); err != nil || h.Version != 2 {
		t.Errorf("unknown enum value: %+v, %v (want kept as 2)", h, err)
	}
	var resp WorkloadResponse
	if err := resp.Unmarshal(unhex(t, "12 00")); !errors.Is(err, ErrNoPayload) {
		t.Errorf("response without ack: %v, want ErrNoPayload", err)
	}
}

// reference builds the schema of zds.proto with the protobuf runtime, so
// that our hand-written codec can be compared with the reference
// implementation of the wire format.
func reference(t testing.TB) protoreflect.FileDescriptor { return schema(t, true) }

// istioSchema is zds.proto without ambpf's extension: what Istio's
// components decode with.
func istioSchema(t testing.TB) protoreflect.FileDescriptor { return schema(t, false) }

func schema(t testing.TB, ambpf bool) protoreflect.FileDescriptor {
	t.Helper()
	boolean := descriptorpb.FieldDescriptorProto_TYPE_BOOL.Enum()
	str := descriptorpb.FieldDescriptorProto_TYPE_STRING.Enum()
	msg := descriptorpb.FieldDescriptorProto_TYPE_MESSAGE.Enum()
	enum := descriptorpb.FieldDescriptorProto_TYPE_ENUM.Enum()
	opt := descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL.Enum()
	fld := func(name string, num int32, typ *descriptorpb.FieldDescriptorProto_Type, typeName string, oneof *int32) *descriptorpb.FieldDescriptorProto {
		f := &descriptorpb.FieldDescriptorProto{Name: &name, Number: &num, Type: typ, Label: opt, OneofIndex: oneof, JsonName: proto.String(name)}
		if typeName != "" {
			f.TypeName = proto.String(".istio.workload.zds." + typeName)
		}
		return f
	}
	m := func(name string, fields ...*descriptorpb.FieldDescriptorProto) *descriptorpb.DescriptorProto {
		d := &descriptorpb.DescriptorProto{Name: proto.String(name), Field: fields}
		for _, f := range fields {
			if f.OneofIndex != nil {
				d.OneofDecl = []*descriptorpb.OneofDescriptorProto{{Name: proto.String("payload")}}
			}
		}
		return d
	}
	zero := proto.Int32(0)
	info := m("WorkloadInfo", fld("name", 1, str, "", nil), fld("namespace", 2, str, "", nil), fld("service_account", 3, str, "", nil))
	if ambpf {
		info.Field = append(info.Field, fld("ambpf_fast_path", 1000, boolean, "", nil), fld("ambpf_reuseport", 1001, enum, "AmbpfReusePort", nil))
	}
	fdp := &descriptorpb.FileDescriptorProto{
		Name:    proto.String("zds.proto"),
		Package: proto.String("istio.workload.zds"),
		Syntax:  proto.String("proto3"),
		EnumType: []*descriptorpb.EnumDescriptorProto{{
			Name: proto.String("Version"),
			Value: []*descriptorpb.EnumValueDescriptorProto{
				{Name: proto.String("NOT_USED"), Number: proto.Int32(0)},
				{Name: proto.String("V1"), Number: proto.Int32(1)},
			},
		}},
		MessageType: []*descriptorpb.DescriptorProto{
			m("ZdsHello", fld("version", 1, enum, "Version", nil)),
			info,
			m("AddWorkload", fld("uid", 1, str, "", nil), fld("workload_info", 2, msg, "WorkloadInfo", nil)),
			m("KeepWorkload", fld("uid", 1, str, "", nil)),
			m("DelWorkload", fld("uid", 2, str, "", nil)),
			m("SnapshotSent"),
			m("WorkloadRequest", fld("add", 1, msg, "AddWorkload", zero), fld("del", 2, msg, "DelWorkload", zero),
				fld("snapshot_sent", 3, msg, "SnapshotSent", zero), fld("keep", 5, msg, "KeepWorkload", zero)),
			m("Ack", fld("error", 1, str, "", nil)),
			m("WorkloadResponse", fld("ack", 1, msg, "Ack", zero)),
		},
	}
	if ambpf {
		fdp.EnumType = append(fdp.EnumType, &descriptorpb.EnumDescriptorProto{
			Name: proto.String("AmbpfReusePort"),
			Value: []*descriptorpb.EnumValueDescriptorProto{
				{Name: proto.String("AMBPF_REUSEPORT_UNKNOWN"), Number: proto.Int32(0)},
				{Name: proto.String("AMBPF_REUSEPORT_ALLOWED"), Number: proto.Int32(1)},
				{Name: proto.String("AMBPF_REUSEPORT_REFUSED"), Number: proto.Int32(2)},
			},
		})
	}
	fd, err := protodesc.NewFile(fdp, nil)
	if err != nil {
		t.Fatalf("build reference descriptor: %v", err)
	}
	return fd
}

// refRequest decodes b with the protobuf runtime and converts the result
// to our types. ok is false when the runtime rejects b.
func refRequest(fd protoreflect.FileDescriptor, b []byte) (p RequestPayload, ok bool) {
	m := dynamicpb.NewMessage(fd.Messages().ByName("WorkloadRequest"))
	if err := proto.Unmarshal(b, m); err != nil {
		return nil, false
	}
	od := m.Descriptor().Oneofs().ByName("payload")
	f := m.WhichOneof(od)
	if f == nil {
		return nil, true
	}
	sub := m.Get(f).Message()
	get := func(name protoreflect.Name) string {
		return sub.Get(sub.Descriptor().Fields().ByName(name)).String()
	}
	switch f.Name() {
	case "add":
		a := &AddWorkload{UID: get("uid")}
		if wf := sub.Descriptor().Fields().ByName("workload_info"); sub.Has(wf) {
			w := sub.Get(wf).Message()
			s := func(n protoreflect.Name) string { return w.Get(w.Descriptor().Fields().ByName(n)).String() }
			a.WorkloadInfo = &WorkloadInfo{Name: s("name"), Namespace: s("namespace"), ServiceAccount: s("service_account")}
			if ff := w.Descriptor().Fields().ByName("ambpf_fast_path"); ff != nil {
				a.WorkloadInfo.FastPath = w.Get(ff).Bool()
			}
			if rf := w.Descriptor().Fields().ByName("ambpf_reuseport"); rf != nil {
				a.WorkloadInfo.ReusePort = ReusePort(w.Get(rf).Enum())
			}
		}
		return a, true
	case "del":
		return &DelWorkload{UID: get("uid")}, true
	case "keep":
		return &KeepWorkload{UID: get("uid")}, true
	}
	return &SnapshotSent{}, true
}

// TestFastPathExtension: ambpf's WorkloadInfo.ambpf_fast_path (field
// 1000, a varint) is encoded only when set, so an Add without it is
// byte for byte what Istio's agent sends; Istio's schema decodes an Add
// with it to the same workload, the field skipped as unknown; and a
// field 1000 of another wire type is unknown to us too.
func TestFastPathExtension(t *testing.T) {
	info := &WorkloadInfo{Name: "web-0", Namespace: "shop", ServiceAccount: "sa"}
	plain, _ := WorkloadRequest{Payload: &AddWorkload{UID: "u", WorkloadInfo: info}}.Marshal()
	fp := *info
	fp.FastPath = true
	ext, _ := WorkloadRequest{Payload: &AddWorkload{UID: "u", WorkloadInfo: &fp}}.Marshal()
	if !bytes.HasSuffix(ext, unhex(t, "c0 3e 01")) || len(ext) != len(plain)+3 {
		t.Errorf("with the fast path: % x, want % x with c0 3e 01 (field 1000 = 1) in the info", ext, plain)
	}
	if got, ok := refRequest(istioSchema(t), ext); !ok || !reflect.DeepEqual(got, &AddWorkload{UID: "u", WorkloadInfo: info}) {
		t.Errorf("Istio's schema decodes % x as %#v (ok=%v), want the workload without the extension", ext, got, ok)
	}
	var w WorkloadInfo
	if err := w.Unmarshal(unhex(t, "c2 3e 01 61 0a 01 6e")); err != nil || w != (WorkloadInfo{Name: "n"}) {
		t.Errorf("field 1000 as bytes: %+v, %v; want it skipped", w, err)
	}
}

// TestReusePortExtension: ambpf's WorkloadInfo.ambpf_reuseport (field
// 1001, an enum) is encoded only when known, so an Add from an agent that
// does not say is byte for byte what Istio's agent sends, and an absent
// field decodes as ReusePortUnknown; Istio's schema decodes an Add with it
// to the same workload, the field skipped as unknown; the protobuf
// runtime reads our encoding of each value as the same enum number; and a
// field 1001 of another wire type is unknown to us too.
func TestReusePortExtension(t *testing.T) {
	info := &WorkloadInfo{Name: "web-0", Namespace: "shop", ServiceAccount: "sa"}
	plain, _ := WorkloadRequest{Payload: &AddWorkload{UID: "u", WorkloadInfo: info}}.Marshal()
	var back WorkloadRequest
	if err := back.Unmarshal(plain); err != nil || back.Payload.(*AddWorkload).WorkloadInfo.ReusePort != ReusePortUnknown {
		t.Errorf("an Add without the field: %#v, %v; want ReusePortUnknown", back.Payload, err)
	}
	for _, c := range []struct {
		v    ReusePort
		wire string
	}{{ReusePortAllowed, "c8 3e 01"}, {ReusePortRefused, "c8 3e 02"}} {
		rp := *info
		rp.ReusePort = c.v
		ext, _ := WorkloadRequest{Payload: &AddWorkload{UID: "u", WorkloadInfo: &rp}}.Marshal()
		if !bytes.HasSuffix(ext, unhex(t, c.wire)) || len(ext) != len(plain)+3 {
			t.Errorf("%s: % x, want % x with %s (field 1001) in the info", c.v, ext, plain, c.wire)
		}
		if got, ok := refRequest(istioSchema(t), ext); !ok || !reflect.DeepEqual(got, &AddWorkload{UID: "u", WorkloadInfo: info}) {
			t.Errorf("%s: Istio's schema decodes % x as %#v (ok=%v), want the workload without the extension", c.v, ext, got, ok)
		}
		if got, ok := refRequest(reference(t), ext); !ok || !reflect.DeepEqual(got, &AddWorkload{UID: "u", WorkloadInfo: &rp}) {
			t.Errorf("%s: the reference decodes % x as %#v (ok=%v)", c.v, ext, got, ok)
		}
	}
	var w WorkloadInfo
	if err := w.Unmarshal(unhex(t, "ca 3e 01 61 0a 01 6e")); err != nil || w != (WorkloadInfo{Name: "n"}) {
		t.Errorf("field 1001 as bytes: %+v, %v; want it skipped", w, err)
	}
	if err := w.Unmarshal(unhex(t, "c8 3e 01 c8 3e 02")); err != nil || w.ReusePort != ReusePortRefused {
		t.Errorf("field 1001 twice: %+v, %v; want the last value", w, err)
	}
}

// TestMatchesReference compares our encodings with the protobuf runtime's.
func TestMatchesReference(t *testing.T) {
	fd := reference(t)
	info := &WorkloadInfo{Name: "web-0", Namespace: "shop", ServiceAccount: "sa"}
	for _, p := range []RequestPayload{
		&AddWorkload{UID: "uid-1", WorkloadInfo: info}, &DelWorkload{UID: "uid-2"},
		&KeepWorkload{UID: "uid-3"}, &SnapshotSent{},
		&AddWorkload{UID: "uid-4", WorkloadInfo: &WorkloadInfo{Name: "web-1", FastPath: true, ReusePort: ReusePortAllowed}},
		&AddWorkload{UID: "uid-5", WorkloadInfo: &WorkloadInfo{Name: "web-2", ReusePort: ReusePortRefused}},
	} {
		b, err := WorkloadRequest{Payload: p}.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		got, ok := refRequest(fd, b)
		if !ok || !reflect.DeepEqual(got, p) {
			t.Errorf("reference decodes our % x as %#v (ok=%v), want %#v", b, got, ok, p)
		}
	}
	// And the other way: the runtime's deterministic encoding of an Add
	// equals ours byte for byte.
	req := dynamicpb.NewMessage(fd.Messages().ByName("WorkloadRequest"))
	add := dynamicpb.NewMessage(fd.Messages().ByName("AddWorkload"))
	wi := dynamicpb.NewMessage(fd.Messages().ByName("WorkloadInfo"))
	for name, v := range map[protoreflect.Name]string{"name": info.Name, "namespace": info.Namespace, "service_account": info.ServiceAccount} {
		wi.Set(wi.Descriptor().Fields().ByName(name), protoreflect.ValueOfString(v))
	}
	add.Set(add.Descriptor().Fields().ByName("uid"), protoreflect.ValueOfString("uid-1"))
	add.Set(add.Descriptor().Fields().ByName("workload_info"), protoreflect.ValueOfMessage(wi))
	req.Set(req.Descriptor().Fields().ByName("add"), protoreflect.ValueOfMessage(add))
	want, err := proto.MarshalOptions{Deterministic: true}.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := WorkloadRequest{Payload: &AddWorkload{UID: "uid-1", WorkloadInfo: info}}.Marshal()
	if !bytes.Equal(got, want) {
		t.Errorf("add: ours % x, reference % x", got, want)
	}
}

// FuzzDecodeRequest checks that decoding never panics and agrees with the
// protobuf runtime: we accept exactly what it accepts (less an empty
// oneof, which ZDS refuses), with the same result, and what we accept
// re-encodes to something that decodes the same.
func FuzzDecodeRequest(f *testing.F) {
	for _, s := range []string{
		"1a00", "2a040a027531", "120412027531", "0a00", "0a0e0a02753112080a026e3112026e73",
		"", "08", "2a05", "0bff", "1a002a040a027531", "2a0408050a02", "0a041204220274",
		// ambpf's extensions: fast path, reuseport allowed, refused, an
		// unknown value, a negative one, the wrong wire type.
		"0a051203c03e01", "0a051203c83e01", "0a051203c83e02", "0a051203c83e07",
		"0a0e120cc83effffffffffffffffff01", "0a061204ca3e0161",
	} {
		b, _ := hex.DecodeString(s)
		f.Add(b)
	}
	fd := reference(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		var r WorkloadRequest
		err := r.Unmarshal(b)
		ref, ok := refRequest(fd, b)
		switch {
		case !ok:
			if err == nil {
				t.Fatalf("% x: reference rejects, we decoded %#v", b, r.Payload)
			}
			return
		case ref == nil:
			if !errors.Is(err, ErrNoPayload) {
				t.Fatalf("% x: empty oneof gave %v, want ErrNoPayload", b, err)
			}
			return
		case err != nil:
			t.Fatalf("% x: reference decodes %#v, we fail: %v", b, ref, err)
		}
		if !reflect.DeepEqual(r.Payload, ref) {
			t.Fatalf("% x: we decode %#v, reference %#v", b, r.Payload, ref)
		}
		again, err := r.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		var r2 WorkloadRequest
		if err := r2.Unmarshal(again); err != nil || !reflect.DeepEqual(r2.Payload, r.Payload) {
			t.Fatalf("re-encode % x: %#v, %v", again, r2.Payload, err)
		}
	})
}
