// Package seal encrypts values kept in a shared store (tokens, refresh
// tokens) with AES-256-GCM.
//
// A sealed value is: a format byte (1), the 4-byte id of the key that sealed
// it, a 12-byte random nonce, then the ciphertext and its 16-byte tag. The
// caller's associated data (the value's key in its store) is authenticated
// but not stored, so a value copied under another key does not open. A
// Keyring seals with its current key and opens with the current key or any
// old one, so keys can be rotated: deploy the new key with the old one listed
// as old, then drop the old one once every value sealed with it has been
// sealed again or has expired.
package seal

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// KeySize is the size of a sealing key: 32 bytes (AES-256).
const KeySize = 32

// format is the first byte of every sealed value.
const format = 1

// idSize is the size of the key id that follows the format byte.
const idSize = 4

// headerSize is the size of the format byte, key id and nonce.
const headerSize = 1 + idSize + 12

var (
	// ErrUnknownKey is returned by Open when the value was sealed with a
	// key that is neither the current key nor an old one.
	ErrUnknownKey = errors.New("seal: the value was sealed with a key that is not configured (add it to the old keys to open it)")
	// ErrMalformed is returned by Open when the value is not a sealed value.
	ErrMalformed = errors.New("seal: the value is not a sealed value")
	// ErrOpen is returned by Open when the value does not authenticate: it
	// was altered, or sealed for other associated data.
	ErrOpen = errors.New("seal: the value does not authenticate (altered, or sealed for another key)")
)

// key is one AES-256-GCM key and its id.
type key struct {
	id   [idSize]byte
	raw  []byte
	aead cipher.AEAD
}

// Keyring seals with its current key and opens with the current key or any
// old one. It is safe for concurrent use.
type Keyring struct {
	keys []key // keys[0] is the current key
}

// New returns a Keyring that seals with current and also opens values
// sealed with any of old. Each key is 32 bytes.
func New(current []byte, old ...[]byte) (*Keyring, error) {
	kr := &Keyring{}
	for i, raw := range append([][]byte{current}, old...) {
		if len(raw) != KeySize {
			what := "the encryption key"
			if i > 0 {
				what = fmt.Sprintf("old encryption key %d", i)
			}
			return nil, fmt.Errorf("seal: %s is %d bytes; want %d (generate one with: head -c 32 /dev/urandom | base64)", what, len(raw), KeySize)
		}
		block, err := aes.NewCipher(raw)
		if err != nil {
			return nil, fmt.Errorf("seal: %w", err)
		}
		aead, err := cipher.NewGCM(block)
		if err != nil {
			return nil, fmt.Errorf("seal: %w", err)
		}
		k := key{raw: append([]byte(nil), raw...), aead: aead}
		copy(k.id[:], derive(raw, "token_broker seal key id"))
		kr.keys = append(kr.keys, k)
	}
	return kr, nil
}

// ParseKey decodes a base64 key (standard or URL alphabet, padded or not;
// surrounding white space, as in a secret file, is ignored) and checks that
// it is 32 bytes. The error never contains the key.
func ParseKey(b64 string) ([]byte, error) {
	s := strings.TrimSpace(b64)
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		if raw, err := enc.DecodeString(s); err == nil {
			if len(raw) != KeySize {
				return nil, fmt.Errorf("seal: the key decodes to %d bytes; want %d (generate one with: head -c 32 /dev/urandom | base64)", len(raw), KeySize)
			}
			return raw, nil
		}
	}
	return nil, errors.New("seal: the key is not valid base64 (generate one with: head -c 32 /dev/urandom | base64)")
}

// ParseKeyring returns the Keyring of a current key and old keys as
// configured: each is passed through resolve (which expands placeholders;
// nil leaves it as is), then decoded by ParseKey. An error names the
// failing key by its setting: name, or oldName[i] for old[i]; it never
// contains a key. Without any key (current empty, no old ones) it returns a
// nil Keyring and no error: there is nothing to seal with.
func ParseKeyring(name, current, oldName string, old []string, resolve func(string) (string, error)) (*Keyring, error) {
	if resolve == nil {
		resolve = func(v string) (string, error) { return v, nil }
	}
	if current == "" && len(old) == 0 {
		return nil, nil
	}
	if current == "" {
		return nil, fmt.Errorf("%s is required: 32 random bytes in base64 (head -c 32 /dev/urandom | base64)", name)
	}
	raws := make([][]byte, 0, 1+len(old))
	for i, v := range append([]string{current}, old...) {
		setting := name
		if i > 0 {
			setting = fmt.Sprintf("%s[%d]", oldName, i-1)
		}
		v, err := resolve(v)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", setting, err)
		}
		raw, err := ParseKey(v)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", setting, err)
		}
		raws = append(raws, raw)
	}
	return New(raws[0], raws[1:]...)
}

// IsSealed reports whether b starts like a sealed value (its format
// byte). Values a Keyring has not sealed, such as tokens in clear
// (printable text), do not.
func IsSealed(b []byte) bool { return len(b) > 0 && b[0] == format }

// IsCurrent reports whether sealed was sealed with kr's current key (its
// key id), so that a value sealed with an old key, or not sealed, can be
// sealed again with the current one. It does not authenticate sealed
// (Open does). It is false for a nil Keyring.
func (kr *Keyring) IsCurrent(sealed []byte) bool {
	return kr != nil && len(sealed) >= 1+idSize && IsSealed(sealed) && hmac.Equal(kr.keys[0].id[:], sealed[1:1+idSize])
}

// Fingerprint identifies kr's keys, in order, without revealing them (a
// hash of a subkey derived from each): keyrings with the same keys have
// the same fingerprint. It is "" for a nil Keyring.
func (kr *Keyring) Fingerprint() string {
	if kr == nil {
		return ""
	}
	h := sha256.New()
	for _, d := range kr.Derive("token_broker keyring fingerprint") {
		h.Write(d)
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
}

// Seal encrypts plaintext with the current key, authenticating ad.
func (kr *Keyring) Seal(plaintext, ad []byte) ([]byte, error) {
	k := kr.keys[0]
	out := make([]byte, headerSize, headerSize+len(plaintext)+k.aead.Overhead())
	out[0] = format
	copy(out[1:], k.id[:])
	if _, err := rand.Read(out[1+idSize : headerSize]); err != nil {
		return nil, fmt.Errorf("seal: reading a random nonce: %w", err)
	}
	return k.aead.Seal(out, out[1+idSize:headerSize], plaintext, ad), nil
}

// Open decrypts a value made by Seal with the same ad, with whichever
// configured key sealed it.
func (kr *Keyring) Open(sealed, ad []byte) ([]byte, error) {
	if len(sealed) < headerSize+16 || sealed[0] != format {
		return nil, ErrMalformed
	}
	found := false
	for _, k := range kr.keys {
		if !hmac.Equal(k.id[:], sealed[1:1+idSize]) {
			continue
		}
		found = true
		if pt, err := k.aead.Open(nil, sealed[1+idSize:headerSize], sealed[headerSize:], ad); err == nil {
			return pt, nil
		}
	}
	if !found {
		return nil, ErrUnknownKey
	}
	return nil, ErrOpen
}

// Derive returns, for each key (current first), a 32-byte subkey for
// purpose, independent of the sealing key itself: for example the HMAC key
// that turns cache keys into store key names.
func (kr *Keyring) Derive(purpose string) [][]byte {
	out := make([][]byte, len(kr.keys))
	for i, k := range kr.keys {
		out[i] = derive(k.raw, purpose)
	}
	return out
}

// derive is HMAC-SHA-256(key, purpose).
func derive(k []byte, purpose string) []byte {
	m := hmac.New(sha256.New, k)
	m.Write([]byte(purpose))
	return m.Sum(nil)
}
