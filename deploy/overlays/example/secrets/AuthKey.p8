PLACEHOLDER: replace this file with the AuthKey_<KEYID>.p8 downloaded from Apple's
developer portal (Keys, "Apple Push Notifications service"). Never commit the real key.
