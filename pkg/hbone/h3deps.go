package hbone

// Holds quic-go in go.mod until the HTTP/3 transport imports it; delete then.
import (
	_ "github.com/quic-go/quic-go"
	_ "github.com/quic-go/quic-go/http3"
)
