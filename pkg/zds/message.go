package zds

import (
	"errors"
	"fmt"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
)

// Field numbers, from zds.proto.
const (
	fieldHelloVersion = 1

	fieldInfoName           = 1
	fieldInfoNamespace      = 2
	fieldInfoServiceAccount = 3
	// fieldInfoFastPath is ambpf's extension (zds.proto): far above
	// Istio's numbers, so that a field Istio adds never collides with it.
	fieldInfoFastPath = 1000
	// fieldInfoReusePort is ambpf's second extension (zds.proto).
	fieldInfoReusePort = 1001

	fieldAddUID  = 1
	fieldAddInfo = 2
	fieldKeepUID = 1
	fieldDelUID  = 2 // sic: DelWorkload's uid is field 2

	fieldRequestAdd          = 1
	fieldRequestDel          = 2
	fieldRequestSnapshotSent = 3
	fieldRequestKeep         = 5

	fieldAckError    = 1
	fieldResponseAck = 1
)

// Version is the ZdsHello protocol version. Unknown values are kept, as
// proto3 enums are open.
type Version int32

const (
	VersionNotUsed Version = 0
	V1             Version = 1
)

// Hello is ZdsHello, the proxy's first message.
type Hello struct {
	Version Version
}

// WorkloadInfo names the pod a workload runs in.
type WorkloadInfo struct {
	Name           string
	Namespace      string
	ServiceAccount string
	// FastPath is ambpf's extension (ambpf_fast_path = 1000): the agent
	// may redirect the pod's app sockets into the proxy's with the in-pod
	// fast path (pkg/fastpath), so the proxy must read them without
	// splice. Istio's agent never sends it (false); Istio's proxy ignores
	// it, as proto3 does any unknown field.
	FastPath bool
	// ReusePort is ambpf's second extension (ambpf_reuseport = 1001):
	// whether the proxy may put SO_REUSEPORT on the pod's listeners, as
	// the agent's probe of the kernel found (bpf_sk_assign refuses
	// SO_REUSEPORT listeners before Linux 6.6, and the datapath then drops
	// what it captures). ReusePortUnknown, the zero value, is what an
	// agent that does not say sends (Istio's, an older ambpf-agent): it is
	// omitted on the wire, and the proxy decides by itself.
	ReusePort ReusePort
}

// ReusePort is ambpf's enum AmbpfReusePort (zds.proto): the agent's
// answer to whether the pod's listeners may use SO_REUSEPORT. Unknown
// values are kept, as proto3 enums are open; a proxy takes them as
// ReusePortUnknown.
type ReusePort int32

const (
	// ReusePortUnknown: the agent did not say (the field was absent).
	ReusePortUnknown ReusePort = 0
	// ReusePortAllowed: the datapath can steer to SO_REUSEPORT listeners.
	ReusePortAllowed ReusePort = 1
	// ReusePortRefused: it cannot; the pod's listeners must go without.
	ReusePortRefused ReusePort = 2
)

// String names r as zds.proto does, or gives its number when unknown.
func (r ReusePort) String() string {
	switch r {
	case ReusePortUnknown:
		return "unknown"
	case ReusePortAllowed:
		return "allowed"
	case ReusePortRefused:
		return "refused"
	}
	return fmt.Sprintf("ReusePort(%d)", int32(r))
}

// AddWorkload asks the proxy to start a pod proxy. WorkloadInfo is
// required by the protocol; nil means it was absent on the wire.
type AddWorkload struct {
	UID          string
	WorkloadInfo *WorkloadInfo
}

// KeepWorkload, in a snapshot only, names a pod the agent knows but whose
// netns it cannot open.
type KeepWorkload struct {
	UID string
}

// DelWorkload asks the proxy to stop a pod proxy.
type DelWorkload struct {
	UID string
}

// SnapshotSent ends the snapshot.
type SnapshotSent struct{}

// Ack answers every request; an empty Error means success.
type Ack struct {
	Error string
}

// RequestPayload is the WorkloadRequest oneof: one of *AddWorkload,
// *DelWorkload, *SnapshotSent or *KeepWorkload. The set is closed.
type RequestPayload interface {
	requestField() protowire.Number
	appendProto(b []byte) []byte
}

func (*AddWorkload) requestField() protowire.Number  { return fieldRequestAdd }
func (*DelWorkload) requestField() protowire.Number  { return fieldRequestDel }
func (*SnapshotSent) requestField() protowire.Number { return fieldRequestSnapshotSent }
func (*KeepWorkload) requestField() protowire.Number { return fieldRequestKeep }

// WorkloadRequest is an agent->proxy message.
type WorkloadRequest struct {
	Payload RequestPayload
}

// WorkloadResponse is a proxy->agent message. Ack nil means the oneof was
// empty.
type WorkloadResponse struct {
	Ack *Ack
}

// ErrNoPayload is returned when a WorkloadRequest or WorkloadResponse
// carries no known oneof member.
var ErrNoPayload = errors.New("no known payload")

// Marshal encodes h.
func (h Hello) Marshal() []byte { return h.appendProto(nil) }

func (h Hello) appendProto(b []byte) []byte {
	if h.Version != 0 {
		b = protowire.AppendTag(b, fieldHelloVersion, protowire.VarintType)
		// Negative enum values are sign-extended to 64 bits, as int32 is.
		b = protowire.AppendVarint(b, uint64(int64(h.Version)))
	}
	return b
}

// Unmarshal merges the encoded message b into h.
func (h *Hello) Unmarshal(b []byte) error {
	return eachField(b, func(f field) error {
		if f.num == fieldHelloVersion && f.typ == protowire.VarintType {
			h.Version = Version(int32(f.v))
		}
		return nil
	})
}

// Marshal encodes w.
func (w WorkloadInfo) Marshal() []byte { return w.appendProto(nil) }

func (w WorkloadInfo) appendProto(b []byte) []byte {
	b = appendString(b, fieldInfoName, w.Name)
	b = appendString(b, fieldInfoNamespace, w.Namespace)
	b = appendString(b, fieldInfoServiceAccount, w.ServiceAccount)
	if w.FastPath { // proto3: false is omitted
		b = protowire.AppendTag(b, fieldInfoFastPath, protowire.VarintType)
		b = protowire.AppendVarint(b, 1)
	}
	if w.ReusePort != ReusePortUnknown { // proto3: the zero enum value is omitted
		b = protowire.AppendTag(b, fieldInfoReusePort, protowire.VarintType)
		// Negative enum values are sign-extended to 64 bits, as int32 is.
		b = protowire.AppendVarint(b, uint64(int64(w.ReusePort)))
	}
	return b
}

// Unmarshal merges the encoded message b into w.
func (w *WorkloadInfo) Unmarshal(b []byte) error {
	return eachField(b, func(f field) error {
		switch f.num {
		case fieldInfoName:
			return f.string(&w.Name)
		case fieldInfoNamespace:
			return f.string(&w.Namespace)
		case fieldInfoServiceAccount:
			return f.string(&w.ServiceAccount)
		case fieldInfoFastPath:
			if f.typ == protowire.VarintType {
				w.FastPath = f.v != 0
			}
		case fieldInfoReusePort:
			if f.typ == protowire.VarintType {
				w.ReusePort = ReusePort(int32(f.v))
			}
		}
		return nil
	})
}

// Marshal encodes a.
func (a *AddWorkload) Marshal() []byte { return a.appendProto(nil) }

func (a *AddWorkload) appendProto(b []byte) []byte {
	b = appendString(b, fieldAddUID, a.UID)
	if a.WorkloadInfo != nil {
		b = appendMessage(b, fieldAddInfo, a.WorkloadInfo.appendProto)
	}
	return b
}

// Unmarshal merges the encoded message b into a.
func (a *AddWorkload) Unmarshal(b []byte) error {
	return eachField(b, func(f field) error {
		switch f.num {
		case fieldAddUID:
			return f.string(&a.UID)
		case fieldAddInfo:
			if f.typ != protowire.BytesType {
				return nil
			}
			if a.WorkloadInfo == nil {
				a.WorkloadInfo = &WorkloadInfo{}
			}
			return a.WorkloadInfo.Unmarshal(f.data)
		}
		return nil
	})
}

// Marshal encodes k.
func (k *KeepWorkload) Marshal() []byte { return k.appendProto(nil) }

func (k *KeepWorkload) appendProto(b []byte) []byte {
	return appendString(b, fieldKeepUID, k.UID)
}

// Unmarshal merges the encoded message b into k.
func (k *KeepWorkload) Unmarshal(b []byte) error {
	return eachField(b, func(f field) error {
		if f.num == fieldKeepUID {
			return f.string(&k.UID)
		}
		return nil
	})
}

// Marshal encodes d.
func (d *DelWorkload) Marshal() []byte { return d.appendProto(nil) }

func (d *DelWorkload) appendProto(b []byte) []byte {
	return appendString(b, fieldDelUID, d.UID)
}

// Unmarshal merges the encoded message b into d.
func (d *DelWorkload) Unmarshal(b []byte) error {
	return eachField(b, func(f field) error {
		if f.num == fieldDelUID {
			return f.string(&d.UID)
		}
		return nil
	})
}

// Marshal encodes s (always empty).
func (s *SnapshotSent) Marshal() []byte { return s.appendProto(nil) }

func (*SnapshotSent) appendProto(b []byte) []byte { return b }

// Unmarshal checks that b is well-formed; SnapshotSent has no fields.
func (*SnapshotSent) Unmarshal(b []byte) error {
	return eachField(b, func(field) error { return nil })
}

// Marshal encodes a.
func (a Ack) Marshal() []byte { return a.appendProto(nil) }

func (a Ack) appendProto(b []byte) []byte {
	return appendString(b, fieldAckError, a.Error)
}

// Unmarshal merges the encoded message b into a.
func (a *Ack) Unmarshal(b []byte) error {
	return eachField(b, func(f field) error {
		if f.num == fieldAckError {
			return f.string(&a.Error)
		}
		return nil
	})
}

// Marshal encodes r; it fails when r has no payload.
func (r WorkloadRequest) Marshal() ([]byte, error) {
	if r.Payload == nil {
		return nil, fmt.Errorf("marshal request: %w", ErrNoPayload)
	}
	return appendMessage(nil, r.Payload.requestField(), r.Payload.appendProto), nil
}

// Unmarshal merges the encoded message b into r. As for any proto3 oneof,
// a member replaces a different one and merges into the same one. It
// fails when, at the end, r has no known payload.
func (r *WorkloadRequest) Unmarshal(b []byte) error {
	err := eachField(b, func(f field) error {
		if f.typ != protowire.BytesType {
			return nil
		}
		var p interface {
			RequestPayload
			Unmarshal([]byte) error
		}
		switch f.num {
		case fieldRequestAdd:
			p = reuse[AddWorkload](r.Payload)
		case fieldRequestDel:
			p = reuse[DelWorkload](r.Payload)
		case fieldRequestSnapshotSent:
			p = reuse[SnapshotSent](r.Payload)
		case fieldRequestKeep:
			p = reuse[KeepWorkload](r.Payload)
		default:
			return nil
		}
		if err := p.Unmarshal(f.data); err != nil {
			return fmt.Errorf("field %d: %w", f.num, err)
		}
		r.Payload = p
		return nil
	})
	if err != nil {
		return fmt.Errorf("decode WorkloadRequest: %w", err)
	}
	if r.Payload == nil {
		return fmt.Errorf("decode WorkloadRequest: %w", ErrNoPayload)
	}
	return nil
}

// reuse returns cur when it already is a *T (so a repeated oneof member
// merges), else a new *T.
func reuse[T any, PT interface {
	*T
	RequestPayload
	Unmarshal([]byte) error
}](cur RequestPayload) PT {
	if p, ok := cur.(PT); ok {
		return p
	}
	return PT(new(T))
}

// Marshal encodes r. A nil Ack encodes the empty oneof.
func (r WorkloadResponse) Marshal() []byte {
	if r.Ack == nil {
		return nil
	}
	return appendMessage(nil, fieldResponseAck, r.Ack.appendProto)
}

// Unmarshal merges the encoded message b into r; it fails when r has no
// Ack at the end.
func (r *WorkloadResponse) Unmarshal(b []byte) error {
	err := eachField(b, func(f field) error {
		if f.num != fieldResponseAck || f.typ != protowire.BytesType {
			return nil
		}
		if r.Ack == nil {
			r.Ack = &Ack{}
		}
		return r.Ack.Unmarshal(f.data)
	})
	if err != nil {
		return fmt.Errorf("decode WorkloadResponse: %w", err)
	}
	if r.Ack == nil {
		return fmt.Errorf("decode WorkloadResponse: %w", ErrNoPayload)
	}
	return nil
}

// field is one decoded field: v for varints, data for length-delimited
// values.
type field struct {
	num  protowire.Number
	typ  protowire.Type
	v    uint64
	data []byte
}

// string stores a string field into dst. A field of another wire type is
// ignored (proto3 treats it as unknown); invalid UTF-8 is an error.
func (f field) string(dst *string) error {
	if f.typ != protowire.BytesType {
		return nil
	}
	if !utf8.Valid(f.data) {
		return fmt.Errorf("field %d: invalid UTF-8", f.num)
	}
	*dst = string(f.data)
	return nil
}

// eachField parses b as a sequence of fields and calls fn for each varint
// or length-delimited field. Fields of other wire types are skipped: no
// ZDS message has one, so they are unknown fields.
func eachField(b []byte, fn func(field) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return protowire.ParseError(n)
		}
		if !num.IsValid() { // ConsumeTag lets numbers above 2^29-1 through
			return fmt.Errorf("invalid field number %d", num)
		}
		b = b[n:]
		f := field{num: num, typ: typ}
		switch typ {
		case protowire.VarintType:
			f.v, n = protowire.ConsumeVarint(b)
		case protowire.BytesType:
			f.data, n = protowire.ConsumeBytes(b)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return fmt.Errorf("field %d: %w", num, protowire.ParseError(n))
		}
		b = b[n:]
		if typ != protowire.VarintType && typ != protowire.BytesType {
			continue
		}
		if err := fn(f); err != nil {
			return err
		}
	}
	return nil
}

// appendString appends a string field, omitted when empty (proto3).
func appendString(b []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

// appendMessage appends an embedded message field, always present (even
// when empty) because message fields have presence.
func appendMessage(b []byte, num protowire.Number, body func([]byte) []byte) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	inner := body(nil)
	b = protowire.AppendVarint(b, uint64(len(inner)))
	return append(b, inner...)
}
