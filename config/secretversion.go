package config

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
)

// secretVersionKey keys Provider.SecretVersion: random per process, never
// shown or logged, so that a version is no oracle for a secret and means
// nothing outside this process.
var secretVersionKey = func() []byte {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		panic("config: no randomness for the secret version key: " + err.Error())
	}
	return k
}()

// addSecret feeds a resolved secret value to the entry's secret version.
func (e *entry) addSecret(field, value string) {
	if e.secrets == nil {
		e.secrets = &fingerprint{hmac.New(sha256.New, secretVersionKey)}
	}
	e.secrets.add(field, value)
}

// secretVersion is the entry's secret version, "" when it has no secret.
func (e *entry) secretVersion() string {
	if e.secrets == nil {
		return ""
	}
	return hex.EncodeToString(e.secrets.h.Sum(nil))
}
