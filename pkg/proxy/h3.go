//go:build linux

package proxy

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/hbone"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/metrics"
	"github.com/ambpf/ambpf/pkg/sockopt"
)

// TunnelsMetricName counts HBONE tunnels by transport. Istio's TCP
// metrics keep their names, labels and values (request_protocol stays
// "tcp": it names what the tunnel carries, and Kiali and the Istio
// dashboards select on it); the transport, which Istio does not have,
// is this separate counter.
const TunnelsMetricName = "ambpf_hbone_tunnels_total"

// LogTransport is the access-log field with the HBONE transport of a
// tunnelled connection ("h2", "h3"); absent for plaintext connections.
const LogTransport = "hbone.transport"

// h3State is the proxy-wide part of HBONE over HTTP/3: the transport
// counter and the one-time buffer warning.
type h3State struct {
	cfg      H3Config
	tunnels  *prometheus.CounterVec
	tuneOnce sync.Once
	logger   *slog.Logger
	wantByNS map[string]bool
}

// newH3State makes the transport counter; the caller registers it.
func newH3State(cfg H3Config, log *slog.Logger) *h3State {
	h := &h3State{
		tunnels: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: TunnelsMetricName,
			Help: "HBONE tunnels opened, by reporter, transport (h2, h3) and whether HTTP/3 was wanted and fell back to h2.",
		}, []string{"reporter", "transport", "fallback"}),
		cfg:      cfg,
		logger:   log,
		wantByNS: map[string]bool{},
	}
	for _, ns := range cfg.Namespaces {
		h.wantByNS[ns] = true
	}
	return h
}

// wantH3 decides whether HBONE to w is tried over HTTP/3: the workload's
// own hboneTransport, else its namespace, else the mesh-wide flag.
func (h *h3State) wantH3(w *discovery.Workload) bool {
	switch w.HBONETransport {
	case discovery.HBONETransportH3:
		return true
	case discovery.HBONETransportH2:
		return false
	}
	return h.cfg.Dial || h.wantByNS[w.Namespace]
}

// tunnel counts one tunnel and records its transport on the connection's
// access-log line.
func (h *h3State) tunnel(reporter, transport string, fellBack bool, mc *metrics.Conn) {
	h.tunnels.WithLabelValues(reporter, transport, strconv.FormatBool(fellBack)).Inc()
	mc.SetLogAttr(LogTransport, transport)
}

// tune sizes a QUIC socket's buffers and warns, once per proxy, when the
// kernel keeps them below what quic-go wants.
func (h *h3State) tune(c *net.UDPConn, where string) {
	gso, err := hbone.TuneUDP(c)
	if err != nil {
		h.tuneOnce.Do(func() {
			h.logger.Warn("kernel limits QUIC UDP buffers; HBONE over HTTP/3 will be slower", "socket", where, "gso", gso, "err", err)
		})
	}
}

// probeUDP reports at start-up what the kernel gives QUIC sockets:
// buffer sizes (a warning when limited) and GSO.
func (h *h3State) probeUDP() {
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv6loopback})
	if err != nil {
		c, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	}
	if err != nil {
		h.logger.Warn("cannot probe QUIC UDP socket settings", "err", err)
		return
	}
	defer c.Close()
	gso, err := hbone.TuneUDP(c)
	if err != nil {
		h.tuneOnce.Do(func() {
			h.logger.Warn("kernel limits QUIC UDP buffers; HBONE over HTTP/3 will be slower", "gso", gso, "err", err)
		})
		return
	}
	h.logger.Info("HBONE over HTTP/3", "serve", h.cfg.Serve, "dial", h.cfg.Dial,
		"namespaces", h.cfg.Namespaces, "udp_buffer_bytes", hbone.UDPBufferSize, "gso", gso)
}

// listenH3 opens the pod's HTTP/3 socket, UDP [::]:15008, inside its
// netns: the proxy mark (so nothing ever captures its packets) and
// SO_REUSEPORT as on the TCP listeners. IP_TRANSPARENT is left off: the
// socket only receives packets for the pod's own addresses.
func (pd *pod) listenH3(ctx context.Context) (*net.UDPConn, error) {
	addr := "[::]:" + strconv.Itoa(meshconst.InboundHBONEPort)
	pc, err := pd.udpConfig().ListenPacket(ctx, "udp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen udp %s: %w", addr, err)
	}
	c := pc.(*net.UDPConn)
	pd.p.h3.tune(c, "pod "+pd.uid+" "+addr)
	return c, nil
}

// udpConfig sets the options of the pod's QUIC sockets.
func (pd *pod) udpConfig() *net.ListenConfig {
	opts := []sockopt.Opt{sockopt.Mark(meshconst.ProxyMark)}
	if pd.reusePort() {
		opts = append(opts, sockopt.ReusePort())
	}
	return &net.ListenConfig{Control: sockopt.Control(opts...)}
}

// h3ClientSocket makes the pod's HBONE client QUIC socket: [::]:0 in the
// pod's netns with the proxy mark, shared by all its HTTP/3 connections.
func (pd *pod) h3ClientSocket() (net.PacketConn, error) {
	lc := &net.ListenConfig{Control: sockopt.Control(sockopt.Mark(meshconst.ProxyMark))}
	var c *net.UDPConn
	err := pd.ns.Do(func() error {
		pc, err := lc.ListenPacket(context.Background(), "udp", "[::]:0")
		if err != nil {
			return err
		}
		c = pc.(*net.UDPConn)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("udp socket in pod %s: %w", pd.uid, err)
	}
	pd.p.h3.tune(c, "pod "+pd.uid+" client")
	return c, nil
}

// tunnelTransport reads how an HBONE tunnel is carried.
func tunnelTransport(c net.Conn) (transport string, fellBack bool) {
	if hc, ok := c.(*hbone.Conn); ok {
		return hc.Transport(), hc.FellBack()
	}
	return hbone.TransportH2, false
}
