// Package pemkey reads the unencrypted PEM private keys that the registry
// names (private_key_jwt keys, DPoP keys): one reader, one set of messages.
package pemkey

import (
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
)

// Parse reads the first private key of a PEM file: PKCS#1 ("RSA PRIVATE
// KEY"), PKCS#8 ("PRIVATE KEY") or SEC1 ("EC PRIVATE KEY"). Other blocks
// (certificates, "EC PARAMETERS") are skipped. It returns an
// *rsa.PrivateKey, an *ecdsa.PrivateKey or an ed25519.PrivateKey. Errors
// never quote the key.
func Parse(pemBytes []byte) (crypto.Signer, error) {
	for rest := pemBytes; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			return nil, errors.New("no PEM private key found (want RSA PRIVATE KEY, PRIVATE KEY or EC PRIVATE KEY)")
		}
		if _, enc := block.Headers["Proc-Type"]; enc {
			return nil, errors.New("the private key is encrypted: provide it unencrypted, readable only by the broker")
		}
		var key any
		var err error
		switch block.Type {
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(block.Bytes)
		case "ENCRYPTED PRIVATE KEY":
			return nil, errors.New("the private key is encrypted (PKCS#8): provide it unencrypted, readable only by the broker")
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%s block is not a valid key", block.Type)
		}
		// RSA, ECDSA and Ed25519 keys sign; an X25519 key (*ecdh.PrivateKey)
		// does not.
		if s, ok := key.(crypto.Signer); ok {
			return s, nil
		}
		return nil, fmt.Errorf("unsupported private key type %T: use an RSA, EC P-256 or Ed25519 key", key)
	}
}
