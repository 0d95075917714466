package store

import (
	"errors"
	"fmt"

	"golang.org/x/crypto/bcrypt"
)

// MaxPassword is the longest EMSD password (docs/protocol.md EMSD §5).
const MaxPassword = 16

// ErrPasswordTooLong: EMSD credentials carry at most MaxPassword octets.
var ErrPasswordTooLong = errors.New("store: password longer than 16 octets")

// HashPassword returns the bcrypt hash kept in Device.PasswordHash; the
// store never sees the password itself. An empty password gives an empty
// hash: no password.
func HashPassword(pw string) (string, error) {
	if pw == "" {
		return "", nil
	}
	if len(pw) > MaxPassword {
		return "", ErrPasswordTooLong
	}
	h, err := bcrypt.GenerateFromPassword([]byte(pw), bcrypt.DefaultCost)
	if err != nil {
		return "", fmt.Errorf("store: hash password: %w", err)
	}
	return string(h), nil
}

// CheckPassword reports whether pw matches hash. An empty hash matches
// nothing: a device without a password has nothing to check against.
func CheckPassword(hash, pw string) bool {
	if hash == "" {
		return false
	}
	return bcrypt.CompareHashAndPassword([]byte(hash), []byte(pw)) == nil
}
