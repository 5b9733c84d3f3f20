package zds

import (
	"encoding/hex"
	"errors"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"
)

// The agent's end of ZDS decodes what a proxy sends: the hello and the
// responses. FuzzDecodeRequest (message_test.go) covers the proxy's end.

// refMessage decodes b as the named message with the protobuf runtime;
// ok is false when the runtime rejects b.
func refMessage(fd protoreflect.FileDescriptor, name protoreflect.Name, b []byte) (protoreflect.Message, bool) {
	m := dynamicpb.NewMessage(fd.Messages().ByName(name))
	if err := proto.Unmarshal(b, m); err != nil {
		return nil, false
	}
	return m, true
}

// FuzzDecodeResponse checks that a WorkloadResponse decodes exactly when
// the protobuf runtime decodes it with an ack set, to the same error
// text, and that what we decode re-encodes to the same response.
func FuzzDecodeResponse(f *testing.F) {
	for _, s := range []string{
		"0a00", "0a060a046f6f7073", "", "0a", "0a0212", "0a020a00", "0a000a03120161", "1200", "0a020801", "0aff",
	} {
		b, _ := hex.DecodeString(s)
		f.Add(b)
	}
	fd := reference(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		var r WorkloadResponse
		err := r.Unmarshal(b)
		ref, ok := refMessage(fd, "WorkloadResponse", b)
		if !ok {
			if err == nil {
				t.Fatalf("% x: reference rejects, we decoded %+v", b, r.Ack)
			}
			return
		}
		ackField := ref.Descriptor().Fields().ByName("ack")
		if !ref.Has(ackField) {
			if !errors.Is(err, ErrNoPayload) {
				t.Fatalf("% x: no ack, we returned %v, want ErrNoPayload", b, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("% x: reference decodes, we fail: %v", b, err)
		}
		ack := ref.Get(ackField).Message()
		want := ack.Get(ack.Descriptor().Fields().ByName("error")).String()
		if r.Ack.Error != want {
			t.Fatalf("% x: ack error %q, reference %q", b, r.Ack.Error, want)
		}
		var again WorkloadResponse
		if err := again.Unmarshal(r.Marshal()); err != nil || again.Ack == nil || again.Ack.Error != r.Ack.Error {
			t.Fatalf("re-encode of %+v decodes to %+v, %v", r.Ack, again.Ack, err)
		}
	})
}

// FuzzDecodeHello checks the proxy's hello against the protobuf runtime:
// same acceptance, same version (unknown enum values kept, as proto3
// does), and a stable re-encoding.
func FuzzDecodeHello(f *testing.F) {
	for _, s := range []string{"0801", "", "0800", "08ffffffffffffffffff01", "0802", "08", "1000", "0a00", "08010802"} {
		b, _ := hex.DecodeString(s)
		f.Add(b)
	}
	fd := reference(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		var h Hello
		err := h.Unmarshal(b)
		ref, ok := refMessage(fd, "ZdsHello", b)
		if !ok {
			if err == nil {
				t.Fatalf("% x: reference rejects, we decoded %+v", b, h)
			}
			return
		}
		if err != nil {
			t.Fatalf("% x: reference decodes, we fail: %v", b, err)
		}
		want := Version(ref.Get(ref.Descriptor().Fields().ByName("version")).Enum())
		if h.Version != want {
			t.Fatalf("% x: version %d, reference %d", b, h.Version, want)
		}
		var again Hello
		if err := again.Unmarshal(h.Marshal()); err != nil || again != h {
			t.Fatalf("re-encode of %+v decodes to %+v, %v", h, again, err)
		}
	})
}
