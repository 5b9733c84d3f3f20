//go:build !linux

package hbone

import "net"

// UDPBufferSize is the socket buffer size quic-go asks for in each
// direction.
const UDPBufferSize = 7 << 20

// TuneUDP sets the socket buffers to UDPBufferSize where the platform
// allows it; GSO is Linux only.
func TuneUDP(c *net.UDPConn) (gso bool, err error) {
	if err := c.SetReadBuffer(UDPBufferSize); err != nil {
		return false, err
	}
	return false, c.SetWriteBuffer(UDPBufferSize)
}
