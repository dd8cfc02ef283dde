package redisstore

import (
	"fmt"
	"slices"
)

// secretField is a setting that Resolve expands, with its name in errors.
type secretField struct {
	name  string
	value *string
}

// Resolve returns s with its secrets (Username, Password, EncryptionKey,
// EncryptionKeysOld) passed through resolve, which expands placeholders;
// the error names the field.
func (s Settings) Resolve(resolve func(string) (string, error)) (Settings, error) {
	s.EncryptionKeysOld = slices.Clone(s.EncryptionKeysOld)
	fields := []secretField{{"username", &s.Username}, {"password", &s.Password}, {"encryption_key", &s.EncryptionKey}}
	for i := range s.EncryptionKeysOld {
		fields = append(fields, secretField{fmt.Sprintf("encryption_keys_old[%d]", i), &s.EncryptionKeysOld[i]})
	}
	for _, f := range fields {
		out, err := resolve(*f.value)
		if err != nil {
			return Settings{}, fmt.Errorf("%s: %w", f.name, err)
		}
		*f.value = out
	}
	return s, nil
}
