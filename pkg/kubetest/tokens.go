package kubetest

import "path/filepath"

// ServiceAccountSigningKeyFile is the PEM ECDSA key the API server signs
// service account tokens with (--service-account-signing-key-file), for
// tests that need a token the API server issues no API for (one already
// expired).
func (cp *ControlPlane) ServiceAccountSigningKeyFile() string {
	return filepath.Join(cp.Dir, "sa.key")
}
