package hbone

// Drain asks every HTTP/2 client of the server to go elsewhere: each
// connection is sent a GOAWAY, the streams already open go on, and the
// connection closes when its last stream ends; connections accepted from
// now on are drained at once. A client's pool then opens new tunnels on a
// new connection (to whichever listener now has the port: in an upgrade,
// the new proxy's). Listeners are the caller's to close. HTTP/3
// connections are not drained.
func (s *Server) Drain() {
	s.mu.Lock()
	s.draining = true
	conns := make([]*h2conn, 0, len(s.h2conns))
	for c := range s.h2conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.drain()
	}
}
