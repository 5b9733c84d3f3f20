package hbone

import "context"

// Drain asks every HTTP/2 client of the server to go elsewhere: each
// connection is sent a GOAWAY, the streams already open go on, and the
// connection closes when its last stream ends. A client's pool then opens
// new tunnels on a new connection (to whichever listener now has the
// port: in an upgrade, the new proxy's). Listeners are the caller's to
// close. HTTP/3 connections are not drained.
func (s *Server) Drain() {
	// With ConfigureServer (NewServer), Shutdown of the base server starts
	// the graceful shutdown of every connection ServeConn serves; it has
	// no listener or connection of its own to wait for.
	s.h1.Shutdown(context.Background())
}
