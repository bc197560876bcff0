"""One module per method; each defines an `OWDFAMethod` subclass named in conf/method/<name>.yaml."""
