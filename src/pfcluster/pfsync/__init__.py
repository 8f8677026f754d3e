"""pfsync"""
